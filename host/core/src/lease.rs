//! Which run owns a partition: a lease in the server ([`Leases`]), taken when it is free,
//! renewed by compare-and-set every third of its TTL while the run is healthy, and released
//! when the run stops, so that a standby takes over at once after a clean stop and within a
//! TTL of a host's death.
//!
//! Which host should hold a partition is the spread's wish ([`crate::spread`]): a free
//! lease is taken at once by the wanted host and by any other only after [`grace`] (so that
//! partitions land where they are wanted, and still land somewhere if the wanted host does
//! not take them); a holder that is not wanted for a while drains and hands the partition
//! over (so that a host that joins gets its share).
//!
//! The lease is not what keeps exactly-once: the fence is ([`crate::fence`]). A run that
//! lost its lease (paused, cut off) and still commits is refused by the marker chain. The
//! lease keeps one run at a time working on the partition, so that runs do not take it from
//! each other in turn; and a run that cannot renew it for a whole TTL stops working on it
//! before another can have taken it.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{Fatal, Pipeline};
use crate::ports::{
    DedupStore, LeaseError, LeaseState, Leases, Ledger, PluginRuntime, Probe, Publisher, Source,
};
use crate::retry::{Backoff, sleep_unless_shutdown};
use crate::spread::Members;
use crate::status::PipelineStatus;

/// A partition's lease, as one run holds it.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// The lease's key.
    pub key: String,
    /// This run, unique among every run that may ever hold the lease (the fence's owner).
    pub holder: String,
    /// How long the lease lives unrenewed.
    pub ttl: Duration,
    /// The lease's partition, and how many the pipeline has: which host is wanted for it.
    pub partition: u32,
    pub partitions: u32,
}

impl LeaseSettings {
    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// How often a standby looks whether the lease is free, and a failed write is tried
    /// again: a tenth of the TTL, between 100 and 500 ms (a standby takes over within this
    /// of a release).
    fn look_every(&self) -> Duration {
        (self.ttl / 10).clamp(Duration::from_millis(100), Duration::from_millis(500))
    }

    /// How long a free lease waits for its wanted host before another takes it, and how
    /// long a holder is unwanted before it hands the partition over (members seen a moment
    /// apart do not move it): a third of the TTL.
    pub fn grace(&self) -> Duration {
        self.ttl / 3
    }

    fn wanted(&self, members: &Members) -> Option<String> {
        members.wanted(self.partition, self.partitions)
    }
}

/// A lease this run holds: its key's revision, and when the write that gave it was sent (the
/// server's TTL runs from a moment after that).
#[derive(Debug, Clone, Copy)]
pub struct Held {
    revision: u64,
    written_at: Instant,
}

/// How keeping a lease ended.
#[derive(Debug)]
pub enum Kept {
    /// Asked to stop: the lease is still held.
    Stopped(Held),
    /// Asked to stop after handing the partition over: the lease is still held, for the
    /// wanted host once it is released.
    HandedOver(Held),
    /// Lost: another run wrote it, or it could not be renewed for a whole TTL.
    Lost(String),
}

/// Waits until this run holds the lease, showing who holds it meanwhile: takes it when it
/// is free, at once if this host is wanted for it (or none is known), else once it has been
/// free for [`LeaseSettings::grace`]. `None` on shutdown first.
pub async fn take<L: Leases>(
    leases: &L,
    lease: &LeaseSettings,
    members: &Members,
    status: &PipelineStatus,
    shutdown: &CancellationToken,
) -> Option<Held> {
    // When the last write that failed was sent: it may have gone through.
    let mut tried_at = None;
    // Since when the lease has been seen free.
    let mut free_since = None;
    loop {
        match leases.read(&lease.key).await {
            Ok(LeaseState {
                holder: Some(holder),
                revision,
            }) if holder == lease.holder => {
                // A take whose answer was lost went through.
                return Some(Held {
                    revision,
                    written_at: tried_at.unwrap_or_else(Instant::now),
                });
            }
            Ok(LeaseState {
                holder: Some(holder),
                ..
            }) => {
                free_since = None;
                status.standing_by(Some(&holder));
            }
            Ok(LeaseState {
                holder: None,
                revision,
            }) if lease
                .wanted(members)
                .is_none_or(|wanted| wanted == members.me())
                || free_since.get_or_insert_with(Instant::now).elapsed() >= lease.grace() =>
            {
                status.standing_by(None);
                let written_at = Instant::now();
                match leases
                    .write(&lease.key, &lease.holder, revision, lease.ttl)
                    .await
                {
                    Ok(revision) => {
                        return Some(Held {
                            revision,
                            written_at,
                        });
                    }
                    // Another standby was first.
                    Err(LeaseError::Moved(_)) => {}
                    Err(error) => {
                        tried_at = Some(written_at);
                        tracing::warn!(%error, "taking the partition's lease failed; trying again");
                    }
                }
            }
            // Free, and waiting for the host wanted for it.
            Ok(LeaseState { holder: None, .. }) => status.standing_by(None),
            Err(error) => tracing::warn!(%error, "reading the partition's lease failed"),
        }
        if !sleep_unless_shutdown(lease.look_every(), shutdown).await {
            return None;
        }
    }
}

/// Renews the lease until `stop` fires or it is lost. A renewal that fails for a while is
/// tried again; the lease counts as lost once a whole TTL has passed since the last write
/// that went through was sent, since by then another run may hold it.
///
/// Once another member has been wanted for the partition for [`LeaseSettings::grace`]
/// (and this host sees itself among the members: a host whose own registration lapsed
/// knows too little to give anything away), `work` is cancelled, so that the run drains;
/// the lease is renewed until it has (`stop`), and then released for the wanted host.
pub async fn keep<L: Leases>(
    leases: &L,
    lease: &LeaseSettings,
    members: &Members,
    mut held: Held,
    work: &CancellationToken,
    stop: &CancellationToken,
) -> Kept {
    let mut members = members.clone();
    let mut next = held.written_at + lease.renew_every();
    // Since when another member has been wanted for the partition.
    let mut unwanted_since = None;
    let mut handed_over = false;
    loop {
        // Another member wanted for the partition, and when to hand it over to it.
        let elsewhere = lease
            .wanted(&members)
            .filter(|wanted| {
                wanted != members.me() && members.includes_me() && !work.is_cancelled()
            })
            .map(|wanted| {
                let since = *unwanted_since.get_or_insert_with(Instant::now);
                (wanted, since + lease.grace())
            });
        if elsewhere.is_none() {
            unwanted_since = None;
        }
        let hand_over_at = elsewhere.as_ref().map_or(next, |(_, at)| *at);
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                return match handed_over {
                    true => Kept::HandedOver(held),
                    false => Kept::Stopped(held),
                };
            }
            () = tokio::time::sleep_until(hand_over_at), if elsewhere.is_some() => {
                let wanted = elsewhere.map(|(wanted, _)| wanted).unwrap_or_default();
                tracing::info!(%wanted, "handing the partition over to the host wanted for it");
                work.cancel();
                handed_over = true;
                continue;
            }
            () = members.changed() => continue,
            () = tokio::time::sleep_until(next) => {}
        }
        let sent = Instant::now();
        if sent >= held.written_at + lease.ttl {
            return Kept::Lost(format!(
                "it could not be renewed for {:?}, its TTL",
                lease.ttl
            ));
        }
        match leases
            .write(&lease.key, &lease.holder, held.revision, lease.ttl)
            .await
        {
            Ok(revision) => {
                held = Held {
                    revision,
                    written_at: sent,
                };
                next = sent + lease.renew_every();
            }
            Err(LeaseError::Moved(reason)) => match leases.read(&lease.key).await {
                // A renewal whose answer was lost went through: this run still holds it.
                Ok(LeaseState {
                    holder: Some(holder),
                    revision,
                }) if holder == lease.holder => {
                    held.revision = revision;
                    next = Instant::now();
                }
                Ok(state) => {
                    return Kept::Lost(format!(
                        "it was taken by {} ({reason})",
                        state.holder.as_deref().unwrap_or("nobody")
                    ));
                }
                Err(error) => {
                    tracing::warn!(%error, "reading the partition's lease failed");
                    next = retry_at(lease, &held);
                }
            },
            Err(error) => {
                tracing::warn!(%error, "renewing the partition's lease failed; trying again");
                next = retry_at(lease, &held);
            }
        }
    }
}

/// When to try a failed renewal again: after a look, or when the lease may expire, if that
/// comes first (then it counts as lost, at the earliest moment another run could take it).
fn retry_at(lease: &LeaseSettings, held: &Held) -> Instant {
    (Instant::now() + lease.look_every()).min(held.written_at + lease.ttl)
}

/// Gives the lease up, so that a standby takes it at once. Best effort: a lease not
/// released expires after its TTL.
pub async fn release<L: Leases>(leases: &L, lease: &LeaseSettings, held: Held) {
    match leases.release(&lease.key, held.revision).await {
        Ok(()) => tracing::info!("released the partition's lease"),
        Err(error) => {
            tracing::warn!(%error, ttl = ?lease.ttl, "releasing the partition's lease failed; it expires after its TTL")
        }
    }
}

/// Runs a partitioned pipeline whenever this run holds its partition's lease: stands by
/// while another run holds it, takes it when it is free (see [`take`]: `members` says which
/// host is wanted for it), consumes (`consume` makes the source, which must not pull before
/// the lease is held) and runs the pipeline while keeping the lease, and stands by again
/// when the lease is lost, another run takes the partition over, or it hands the partition
/// over to the host wanted for it. Returns on shutdown, the lease released, or on a fatal
/// error.
pub async fn run_partition<St, Pu, R, Pr, L, S, E, F, Fut>(
    pipeline: &Pipeline<St, Pu, R, Pr>,
    leases: &L,
    lease: &LeaseSettings,
    members: Members,
    mut consume: F,
    shutdown: CancellationToken,
) -> Result<(), Fatal>
where
    St: DedupStore,
    Pu: Publisher + Ledger,
    R: PluginRuntime,
    Pr: Probe,
    L: Leases,
    S: Source,
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<S, E>>,
{
    loop {
        let Some(held) = take(leases, lease, &members, &pipeline.status, &shutdown).await else {
            pipeline.status.stopped("shut down");
            return Ok(());
        };
        tracing::info!(lease = %lease.key, "took the partition's lease");
        let metrics = &pipeline.metrics;
        metrics.leases_taken.inc();
        metrics.lease_held.set(1);
        let run = shutdown.child_token();
        let stop_keeping = CancellationToken::new();
        let running = async {
            let ran = match source_until_ready(&mut consume, &run).await {
                Some(source) => pipeline.run(source, run.clone()).await,
                None => Ok(()),
            };
            stop_keeping.cancel();
            ran
        };
        let keeping = async {
            let kept = keep(leases, lease, &members, held, &run, &stop_keeping).await;
            if let Kept::Lost(reason) = &kept {
                tracing::warn!(%reason, "lost the partition's lease; stopping work on it and standing by");
                run.cancel();
            }
            kept
        };
        let (ran, kept) = tokio::join!(running, keeping);
        metrics.lease_held.set(0);
        let still_held = match kept {
            Kept::Stopped(held) => Some(held),
            Kept::HandedOver(held) => {
                metrics.handovers.inc();
                Some(held)
            }
            Kept::Lost(_) => {
                metrics.leases_lost.inc();
                None
            }
        };
        match ran {
            Err(Fatal::TakenOver(reason)) => {
                tracing::warn!(%reason, "standing by");
            }
            Err(fatal) => {
                if let Some(held) = still_held {
                    release(leases, lease, held).await;
                }
                return Err(fatal);
            }
            Ok(()) => {
                // Stopped, or handed over to the host wanted for it.
                if let Some(held) = still_held {
                    release(leases, lease, held).await;
                }
                if shutdown.is_cancelled() {
                    return Ok(());
                }
            }
        }
    }
}

/// The source, made as soon as it can be. `None` on `stop` first.
async fn source_until_ready<S, E, F, Fut>(consume: &mut F, stop: &CancellationToken) -> Option<S>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<S, E>>,
{
    let mut backoff = Backoff::new();
    loop {
        match consume().await {
            Ok(source) => return Some(source),
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "consuming the partition failed; retrying");
                if !sleep_unless_shutdown(delay, stop).await {
                    return None;
                }
            }
        }
    }
}
