//! What a pipeline did, as Prometheus metrics: counted where the core decides, registered by
//! the wiring, read by the admin server and the stop log.
//!
//! Names follow Prometheus practice: base units (seconds), `_total` on counters (the
//! encoder adds it), labels of low cardinality only (`pipeline`, `kind`, `step`, `stage`:
//! never a subject or a key). Each metric is one family for the whole process, its series
//! labelled by pipeline, so that `/metrics` describes it once however many pipelines run.
//! The gauges are set from outside the message path: the consumer's own info and the
//! store's properties, polled by the wiring.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::plugin::FailureKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabel {
    pipeline: String,
}

/// A dead letter's kind, as its `Weir-Dlq-Kind` header spells it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    pipeline: String,
    kind: &'static str,
}

/// A step of the message path that retries a transient fault.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    pipeline: String,
    step: &'static str,
}

/// A stage of a batch's way through the pipeline.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    pipeline: String,
    stage: &'static str,
}

/// What a pipeline's plugin is: `weir_plugin_info` is 1 with these labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    pipeline: String,
    sha256: String,
    contract: String,
}

type Counters = Family<PipelineLabel, Counter>;
type Gauges = Family<PipelineLabel, Gauge>;
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 100 µs to ~100 s, for plugin calls and stages alike.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

/// 1 000 to ~4 billion instructions' worth.
fn fuel() -> Histogram {
    Histogram::new(exponential_buckets(1000.0, 4.0, 12))
}

fn batch_inputs() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

/// 1 ms to ~1000 s: an input may wait in its stream long before weir acks it.
fn end_to_end_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 11))
}

/// Every pipeline's metrics: one family per metric. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Metrics {
    received: Counters,
    executed: Counters,
    deduplicated: Counters,
    dead_lettered: Family<KindLabels, Counter>,
    published: Counters,
    acked: Counters,
    handed_back: Counters,
    retries: Family<StepLabels, Counter>,
    reconnects: Counters,
    leases_taken: Counters,
    leases_lost: Counters,
    handovers: Counters,
    plugin_call_seconds: Histograms<PipelineLabel>,
    plugin_fuel: Histograms<PipelineLabel>,
    batch_inputs: Histograms<PipelineLabel>,
    stage_seconds: Histograms<StageLabels>,
    end_to_end_seconds: Histograms<PipelineLabel>,
    consumer_pending: Gauges,
    consumer_ack_pending: Gauges,
    consumer_redelivered: Gauges,
    store_keys: Gauges,
    store_bytes: Gauges,
    store_block_cache_bytes: Gauges,
    lease_held: Gauges,
    plugin_info: Family<PluginLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            received: Counters::default(),
            executed: Counters::default(),
            deduplicated: Counters::default(),
            dead_lettered: Family::default(),
            published: Counters::default(),
            acked: Counters::default(),
            handed_back: Counters::default(),
            retries: Family::default(),
            reconnects: Counters::default(),
            leases_taken: Counters::default(),
            leases_lost: Counters::default(),
            handovers: Counters::default(),
            plugin_call_seconds: Family::new_with_constructor(seconds),
            plugin_fuel: Family::new_with_constructor(fuel),
            batch_inputs: Family::new_with_constructor(batch_inputs),
            stage_seconds: Family::new_with_constructor(seconds),
            end_to_end_seconds: Family::new_with_constructor(end_to_end_seconds),
            consumer_pending: Gauges::default(),
            consumer_ack_pending: Gauges::default(),
            consumer_redelivered: Gauges::default(),
            store_keys: Gauges::default(),
            store_bytes: Gauges::default(),
            store_block_cache_bytes: Gauges::default(),
            lease_held: Gauges::default(),
            plugin_info: Family::default(),
        }
    }
}

impl Metrics {
    /// The series of pipeline `name`, created now so that every metric shows it (at 0)
    /// before anything happens.
    pub fn pipeline(&self, name: &str) -> PipelineMetrics {
        let label = PipelineLabel {
            pipeline: name.to_owned(),
        };
        let counter = |family: &Counters| family.get_or_create(&label).clone();
        let gauge = |family: &Gauges| family.get_or_create(&label).clone();
        let histogram = |family: &Histograms<PipelineLabel>| family.get_or_create(&label).clone();
        PipelineMetrics {
            name: name.to_owned(),
            received: counter(&self.received),
            executed: counter(&self.executed),
            deduplicated: counter(&self.deduplicated),
            published: counter(&self.published),
            acked: counter(&self.acked),
            handed_back: counter(&self.handed_back),
            reconnects: counter(&self.reconnects),
            leases_taken: counter(&self.leases_taken),
            leases_lost: counter(&self.leases_lost),
            handovers: counter(&self.handovers),
            plugin_call_seconds: histogram(&self.plugin_call_seconds),
            plugin_fuel: histogram(&self.plugin_fuel),
            batch_inputs: histogram(&self.batch_inputs),
            end_to_end_seconds: histogram(&self.end_to_end_seconds),
            consumer_pending: gauge(&self.consumer_pending),
            consumer_ack_pending: gauge(&self.consumer_ack_pending),
            consumer_redelivered: gauge(&self.consumer_redelivered),
            store_keys: gauge(&self.store_keys),
            store_bytes: gauge(&self.store_bytes),
            store_block_cache_bytes: gauge(&self.store_block_cache_bytes),
            lease_held: gauge(&self.lease_held),
            families: self.clone(),
        }
    }

    /// Registers every metric in `registry`, names without the `weir_` prefix the root
    /// registry adds.
    pub fn register(&self, registry: &mut Registry) {
        let counters: [(&str, &str, &Counters); 10] = [
            (
                "inputs_received",
                "Inputs the consumer delivered, redeliveries included",
                &self.received,
            ),
            (
                "inputs_executed",
                "Inputs the plugin ran on",
                &self.executed,
            ),
            (
                "inputs_deduplicated",
                "Redelivered inputs found done in the store: the plugin did not run again",
                &self.deduplicated,
            ),
            (
                "messages_published",
                "Outputs and dead letters JetStream acknowledged, re-publishes included",
                &self.published,
            ),
            ("inputs_acked", "Inputs acknowledged", &self.acked),
            (
                "inputs_handed_back",
                "Inputs handed back unprocessed (a nak) for redelivery",
                &self.handed_back,
            ),
            (
                "reconnects",
                "Times the connection to NATS was re-established",
                &self.reconnects,
            ),
            (
                "partition_leases_taken",
                "Times this host took a partition's lease and started work on it",
                &self.leases_taken,
            ),
            (
                "partition_leases_lost",
                "Times this host lost a partition's lease (not renewed within its TTL, or taken)",
                &self.leases_lost,
            ),
            (
                "partition_handovers",
                "Times this host drained a partition and handed it to the host wanted for it",
                &self.handovers,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "inputs_dead_lettered",
            "Inputs committed as dead letters, by kind",
            self.dead_lettered.clone(),
        );
        registry.register(
            "retries",
            "Transient faults retried, by step",
            self.retries.clone(),
        );
        registry.register_with_unit(
            "plugin_call",
            "Time of one plugin call, instantiation included",
            Unit::Seconds,
            self.plugin_call_seconds.clone(),
        );
        registry.register(
            "plugin_fuel",
            "Fuel one plugin call used (about one unit per wasm instruction)",
            self.plugin_fuel.clone(),
        );
        registry.register(
            "batch_inputs",
            "Inputs in one batch",
            self.batch_inputs.clone(),
        );
        registry.register_with_unit(
            "stage",
            "Time a batch spent in a stage: execute, commit, publish or ack",
            Unit::Seconds,
            self.stage_seconds.clone(),
        );
        registry.register_with_unit(
            "end_to_end",
            "Time from an input's storing in its stream to its ack",
            Unit::Seconds,
            self.end_to_end_seconds.clone(),
        );
        let gauges: [(&str, &str, &Gauges); 7] = [
            (
                "consumer_pending_messages",
                "Inputs in the stream not yet delivered to the consumer (its lag)",
                &self.consumer_pending,
            ),
            (
                "consumer_ack_pending_messages",
                "Inputs delivered and not yet acknowledged",
                &self.consumer_ack_pending,
            ),
            (
                "consumer_redelivered_messages",
                "Inputs delivered more than once and not yet acknowledged",
                &self.consumer_redelivered,
            ),
            (
                "store_estimated_keys",
                "Records in the dedup store (RocksDB's estimate)",
                &self.store_keys,
            ),
            (
                "store_size_bytes",
                "Size of the dedup store's files on disk",
                &self.store_bytes,
            ),
            (
                "store_block_cache_bytes",
                "Memory the dedup store's block cache holds",
                &self.store_block_cache_bytes,
            ),
            (
                "partition_lease_held",
                "1 while this host holds the partition's lease",
                &self.lease_held,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "plugin_info",
            "The pipeline's plugin: its sha256 and the contract it exports (always 1)",
            self.plugin_info.clone(),
        );
    }
}

/// One pipeline's series of every metric. Cloning shares them.
#[derive(Clone, Debug)]
pub struct PipelineMetrics {
    name: String,
    pub received: Counter,
    pub executed: Counter,
    pub deduplicated: Counter,
    pub published: Counter,
    pub acked: Counter,
    pub handed_back: Counter,
    pub reconnects: Counter,
    pub leases_taken: Counter,
    pub leases_lost: Counter,
    pub handovers: Counter,
    pub plugin_call_seconds: Histogram,
    pub plugin_fuel: Histogram,
    pub batch_inputs: Histogram,
    pub end_to_end_seconds: Histogram,
    pub consumer_pending: Gauge,
    pub consumer_ack_pending: Gauge,
    pub consumer_redelivered: Gauge,
    pub store_keys: Gauge,
    pub store_bytes: Gauge,
    pub store_block_cache_bytes: Gauge,
    pub lease_held: Gauge,
    /// The families of the metrics with labels beyond the pipeline's.
    families: Metrics,
}

/// A pipeline's metrics registered nowhere, for tests.
impl Default for PipelineMetrics {
    fn default() -> PipelineMetrics {
        Metrics::default().pipeline("")
    }
}

impl PipelineMetrics {
    /// Records which plugin the pipeline runs.
    pub fn plugin_loaded(&self, sha256: &str, contract: &str) {
        let labels = PluginLabels {
            pipeline: self.name.clone(),
            sha256: sha256.to_owned(),
            contract: contract.to_owned(),
        };
        self.families.plugin_info.get_or_create(&labels).set(1);
    }

    /// The pipeline no longer runs this plugin: a reload swapped it.
    pub fn plugin_unloaded(&self, sha256: &str, contract: &str) {
        self.families.plugin_info.remove(&PluginLabels {
            pipeline: self.name.clone(),
            sha256: sha256.to_owned(),
            contract: contract.to_owned(),
        });
    }

    /// Counts `count` dead letters of `kind`, committed.
    pub fn dead_letters(&self, kind: FailureKind, count: u64) {
        if count == 0 {
            return;
        }
        self.families
            .dead_lettered
            .get_or_create(&KindLabels {
                pipeline: self.name.clone(),
                kind: kind.as_str(),
            })
            .inc_by(count);
    }

    /// Counts one retry of `step`.
    pub fn retry(&self, step: &'static str) {
        self.families
            .retries
            .get_or_create(&StepLabels {
                pipeline: self.name.clone(),
                step,
            })
            .inc();
    }

    /// Dead letters by kind, in `FailureKind::ALL` order, kinds never seen left out.
    pub fn dead_letters_by_kind(&self) -> Vec<(&'static str, u64)> {
        FailureKind::ALL
            .into_iter()
            .filter_map(|kind| {
                let labels = KindLabels {
                    pipeline: self.name.clone(),
                    kind: kind.as_str(),
                };
                let count = self.families.dead_lettered.get(&labels)?.get();
                Some((kind.as_str(), count))
            })
            .collect()
    }

    /// Times `elapsed` against `stage`.
    pub fn stage(&self, stage: &'static str, elapsed: Duration) {
        self.families
            .stage_seconds
            .get_or_create(&StageLabels {
                pipeline: self.name.clone(),
                stage,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A copy of the counters, for the stop log and `weir::run`'s report.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.get(),
            executed: self.executed.get(),
            deduplicated: self.deduplicated.get(),
            dead_lettered: self
                .dead_letters_by_kind()
                .iter()
                .map(|(_, count)| count)
                .sum(),
            published: self.published.get(),
            acked: self.acked.get(),
        }
    }
}

/// A copy of a pipeline's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: u64,
    pub executed: u64,
    pub deduplicated: u64,
    pub dead_lettered: u64,
    pub published: u64,
    pub acked: u64,
}
