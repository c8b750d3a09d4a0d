//! End-to-end tests: real nats-server, real RocksDB, real plugins compiled from plugins/.
//! Build the plugins (scripts/build-plugins.sh) and the workspace before running them;
//! scripts/test.sh does both.

mod admin;
mod atomic_batch;
mod chaos;
mod cluster;
mod compile;
mod crash;
mod diff;
mod disk;
mod dlq;
mod faults;
mod harness;
mod hostile;
mod hot_swap;
mod isolation;
mod kv_lease;
mod matrix;
mod partitioned;
mod pipeline;
mod poison;
mod props;
mod python;
mod refusals;
mod replay;
mod reset_learning;
mod restart;
mod scaffold;
mod standby;
mod startup;
mod state;
mod traces;
