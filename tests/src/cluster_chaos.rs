//! The cluster chaos run: three weir hosts share a six-partition orders pipeline on a
//! 3-node nats-server cluster (R3 streams, `sync_interval: always`), a seeded workload
//! arrives, and faults strike at random while it does:
//! - a host SIGKILLed and restarted (a partitioned host keeps nothing on disk, so every
//!   restart is one with an empty store);
//! - a host SIGSTOPped past its leases, then resumed (it must neither publish nor ack);
//! - a host cut off from every node past its leases (each host reaches the cluster through
//!   loopback proxies of its own), then let through again;
//! - a host stopped with SIGTERM (it leaves and hands over) and started again (it joins);
//! - a cluster node SIGKILLed and restarted;
//! - a stream's leader moved (the input's or the output's).
//!
//! For each fault that takes a host away, the time until each partition it held makes
//! progress again elsewhere is taken. At the end the independent verifier checks every
//! output and dead letter exactly once. `weir-chaos --cluster` runs it at any size; the test
//! suite at a small one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::*;

/// The lease TTL the hosts run with: the failover target is this plus two seconds.
pub const TTL_SECS: u64 = 3;
const HOSTS: usize = 3;
const PARTITIONS: u32 = 6;

/// What to run.
#[derive(Debug, Clone)]
pub struct ClusterChaosPlan {
    pub messages: usize,
    pub faults: usize,
    pub seed: u64,
}

/// A fault the run can strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterFault {
    HostKilled,
    HostStopped,
    HostCutOff,
    HostLeft,
    NodeKilled,
    LeaderMoved,
}

impl ClusterFault {
    const ALL: [ClusterFault; 6] = [
        ClusterFault::HostKilled,
        ClusterFault::HostStopped,
        ClusterFault::HostCutOff,
        ClusterFault::HostLeft,
        ClusterFault::NodeKilled,
        ClusterFault::LeaderMoved,
    ];

    fn name(self) -> &'static str {
        match self {
            ClusterFault::HostKilled => "host_kills",
            ClusterFault::HostStopped => "host_stops",
            ClusterFault::HostCutOff => "host_cuts",
            ClusterFault::HostLeft => "host_leaves",
            ClusterFault::NodeKilled => "node_kills",
            ClusterFault::LeaderMoved => "leader_moves",
        }
    }
}

/// What happened, and the verifier's verdict.
#[derive(Debug)]
pub struct ClusterChaosReport {
    pub plan: ClusterChaosPlan,
    pub faults: Vec<ClusterFault>,
    /// Per partition a fault took away with its host: the time from the fault until the
    /// partition's ack floor moved again. A partition with nothing left to do by then has
    /// none.
    pub failovers: Vec<Duration>,
    /// Hosts that did not exit 0 on SIGTERM, with the end of their logs.
    pub unclean_stops: Vec<String>,
    pub verdict: OrdersVerdict,
    pub elapsed: Duration,
}

impl ClusterChaosReport {
    /// Every output and dead letter exactly once, and every host stopped cleanly.
    pub fn passed(&self) -> bool {
        self.verdict.is_exact() && self.unclean_stops.is_empty()
    }

    /// The slowest failover, if any was taken.
    pub fn slowest_failover(&self) -> Option<Duration> {
        self.failovers.iter().max().copied()
    }

    /// The one-line verdict.
    pub fn line(&self) -> String {
        let counts: Vec<String> = ClusterFault::ALL
            .iter()
            .map(|kind| {
                let n = self.faults.iter().filter(|f| *f == kind).count();
                format!("{}={n}", kind.name())
            })
            .collect();
        let failover = match self.slowest_failover() {
            Some(slowest) => format!(
                "failovers={} slowest_failover={:.1}s (target {}s)",
                self.failovers.len(),
                slowest.as_secs_f64(),
                TTL_SECS + 2
            ),
            None => "failovers=0".to_owned(),
        };
        format!(
            "verdict: {} hosts={HOSTS} partitions={PARTITIONS} messages={} {} {failover} {} unclean_stops={} seed={} elapsed={:.1}s",
            if self.passed() {
                "EXACTLY-ONCE"
            } else {
                "FAILED"
            },
            self.plan.messages,
            counts.join(" "),
            self.verdict.counts(),
            self.unclean_stops.len(),
            self.plan.seed,
            self.elapsed.as_secs_f64()
        )
    }
}

/// One weir host: its process, its log, its configuration, and the proxies (one per node)
/// it reaches the cluster through.
struct Host {
    process: WeirProcess,
    log: PathBuf,
    config: PathBuf,
    proxies: Vec<FaultyProxy>,
}

impl Host {
    fn start(&mut self) {
        self.process = spawn_weir(&self.config, Some(&self.log), None);
    }
}

pub async fn run(plan: ClusterChaosPlan) -> ClusterChaosReport {
    let started = Instant::now();
    let mut rng = SeededRng(plan.seed);
    let mut cluster = NatsCluster::start().await;
    // The run's own client stays on node 0, which no fault kills.
    let client = connect_client(&cluster.url(0))
        .await
        .expect("connect to node 0");
    let js = jetstream::new(client.clone());
    create_partitioned_orders_streams(&js, PARTITIONS).await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut hosts = Vec::new();
    for host in 0..HOSTS {
        let mut proxies = Vec::new();
        for node in 0..3 {
            proxies.push(FaultyProxy::start(cluster.port(node)).await);
        }
        let urls: Vec<String> = proxies.iter().map(FaultyProxy::url).collect();
        let config = dir.path().join(format!("h{host}.toml"));
        write_partitioned_orders_config(&config, &urls.join(","), PARTITIONS, TTL_SECS);
        let log = dir.path().join(format!("h{host}.log"));
        let process = spawn_weir(&config, Some(&log), None);
        hosts.push(Host {
            process,
            log,
            config,
            proxies,
        });
    }

    let payloads = order_workload(plan.messages, 50);
    // Paced so that inputs keep arriving while the faults strike (about 2.5 s apart, more
    // for the ones that last a TTL), so that every failover shows as progress.
    let publishing = Duration::from_secs(5 + 4 * plan.faults as u64);
    let chunks = plan.messages.div_ceil(50).max(1) as u32;
    let publisher = publish_spread_through_elections(&js, &payloads, publishing / chunks, |i| {
        format!("orders.in.c{}", i % 16)
    });

    let published = Arc::new(AtomicBool::new(false));
    let publisher = {
        let published = published.clone();
        tokio::spawn(async move {
            publisher.await.expect("the publisher finishes");
            published.store(true, Ordering::SeqCst);
        })
    };
    // Every kind of fault once in each round of six, in a seeded order.
    let mut kinds = ClusterFault::ALL;
    for at in (1..kinds.len()).rev() {
        kinds.swap(at, rng.below(at as u64 + 1) as usize);
    }
    let mut faults = Vec::new();
    let mut measuring: Vec<tokio::task::JoinHandle<Vec<Duration>>> = Vec::new();
    let mut failovers = Vec::new();
    for fault in 0..plan.faults {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1000))).await;
        let kind = kinds[fault % kinds.len()];
        if matches!(kind, ClusterFault::NodeKilled | ClusterFault::LeaderMoved) {
            // A failover under way ends first: an election (4 to 9 s) in the middle of one
            // would be timed as the failover.
            for measured in measuring.drain(..) {
                failovers.extend(measured.await.expect("a failover measured"));
            }
        }
        faults.push(kind);
        let at = started.elapsed().as_secs_f64();
        let host = rng.below(HOSTS as u64) as usize;
        if matches!(
            kind,
            ClusterFault::HostKilled | ClusterFault::HostStopped | ClusterFault::HostCutOff
        ) {
            let held = partitions_held_by(&js, hosts[host].process.id()).await;
            if held.is_empty() {
                println!("        fault {fault}: host {host} holds no partition");
            }
            let (js, published) = (js.clone(), published.clone());
            measuring.push(tokio::spawn(async move {
                if held.is_empty() {
                    return Vec::new();
                }
                let times = time_to_progress(js, held.clone(), published).await;
                let seconds: Vec<String> = times
                    .iter()
                    .map(|t| format!("{:.1}s", t.as_secs_f64()))
                    .collect();
                println!(
                    "        fault {fault}: host {host}'s partitions {held:?} made progress again after {}",
                    seconds.join(", ")
                );
                times
            }));
        }
        let h = &mut hosts[host];
        match kind {
            ClusterFault::HostKilled => {
                println!("{at:>6.1}s fault {fault}: SIGKILL host {host}, then restart it");
                h.process.kill().expect("SIGKILL a host");
                h.process.wait().expect("reap a host");
                tokio::time::sleep(Duration::from_millis(500)).await;
                h.start();
            }
            ClusterFault::HostStopped => {
                println!(
                    "{at:>6.1}s fault {fault}: SIGSTOP host {host} past its leases, then SIGCONT"
                );
                send_signal(&h.process, libc::SIGSTOP);
                tokio::time::sleep(Duration::from_secs(TTL_SECS + 1)).await;
                send_signal(&h.process, libc::SIGCONT);
            }
            ClusterFault::HostCutOff => {
                println!(
                    "{at:>6.1}s fault {fault}: host {host} cut off from the cluster past its leases"
                );
                for proxy in &h.proxies {
                    proxy.cut_off(Duration::from_secs(TTL_SECS + 1));
                }
                tokio::time::sleep(Duration::from_secs(TTL_SECS + 1)).await;
            }
            ClusterFault::HostLeft => {
                println!(
                    "{at:>6.1}s fault {fault}: SIGTERM host {host} (it leaves), then start it (it joins)"
                );
                let status = terminate(&mut h.process);
                if !status.success() {
                    println!("host {host} did not stop cleanly: {status}");
                }
                h.start();
            }
            ClusterFault::NodeKilled => {
                let node = 1 + rng.below(2) as usize;
                println!("{at:>6.1}s fault {fault}: SIGKILL cluster node {node}, then restart it");
                cluster.kill(node);
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster.restart(node).await;
                settle(&js, started).await;
            }
            ClusterFault::LeaderMoved => {
                let stream = ["ORDERS", "ORDERS_OUT"][rng.below(2) as usize];
                println!("{at:>6.1}s fault {fault}: {stream}'s leader steps down");
                step_down(&client, stream).await;
                settle(&js, started).await;
            }
        }
    }
    publisher.await.expect("the publisher finishes");
    println!("{:>6.1}s all published", started.elapsed().as_secs_f64());
    for measured in measuring {
        failovers.extend(measured.await.expect("a failover measured"));
    }
    let processed = tokio::time::timeout(Duration::from_secs(180), async {
        while !partitions_processed(&js, PARTITIONS, &payloads).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    match processed {
        Ok(()) => println!("{:>6.1}s all processed", started.elapsed().as_secs_f64()),
        Err(_) => println!("the hosts did not finish within 180 s of the last input"),
    }
    let mut unclean_stops = Vec::new();
    for (index, host) in hosts.iter_mut().enumerate() {
        let status = terminate(&mut host.process);
        if !status.success() {
            unclean_stops.push(format!("host {index}: {status}\n{}", log_tail(&host.log)));
        }
    }
    let report = ClusterChaosReport {
        plan,
        faults,
        failovers,
        unclean_stops,
        verdict: check_orders_in(&js, "ORDERS_OUT", "ORDERS_OUT", &payloads).await,
        elapsed: started.elapsed(),
    };
    let slow = report
        .slowest_failover()
        .is_some_and(|slowest| slowest > Duration::from_secs(TTL_SECS + 2));
    if !report.passed() || slow {
        println!(
            "the hosts' logs and configurations are kept in {}",
            dir.keep().display()
        );
    }
    report
}

/// The partitions whose leases the weir process `pid` holds now.
async fn partitions_held_by(js: &jetstream::Context, pid: u32) -> Vec<u32> {
    let mut held = Vec::new();
    for partition in 0..PARTITIONS {
        if lease_holder_pid(js, "orders", partition).await == Some(pid) {
            held.push(partition);
        }
    }
    held
}

/// For each of `partitions`, the time until its consumer's ack floor moves past where it
/// is now; none for a partition that has nothing left to do once every input is
/// `published`, or after a minute.
async fn time_to_progress(
    js: jetstream::Context,
    partitions: Vec<u32>,
    published: Arc<AtomicBool>,
) -> Vec<Duration> {
    let since = Instant::now();
    let mut floors = Vec::new();
    for &partition in &partitions {
        floors.push(partition_consumer(&js, partition).await);
    }
    let mut times = Vec::new();
    for (partition, floor) in partitions.into_iter().zip(floors) {
        let Some((floor, _)) = floor else { continue };
        while since.elapsed() < Duration::from_secs(60) {
            match partition_consumer(&js, partition).await {
                Some((now, _)) if now > floor => {
                    times.push(since.elapsed());
                    break;
                }
                Some((_, 0)) if published.load(Ordering::SeqCst) => break,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    times
}

/// A partition consumer's ack floor and how many inputs it has still to finish (pending and
/// unacked), if the cluster answers.
async fn partition_consumer(js: &jetstream::Context, partition: u32) -> Option<(u64, u64)> {
    let stream = js.get_stream("ORDERS").await.ok()?;
    let info = stream
        .consumer_info(format!("weir-p{partition}"))
        .await
        .ok()?;
    Some((
        info.ack_floor.stream_sequence,
        info.num_pending + info.num_ack_pending as u64,
    ))
}

/// Waits until the streams and the lease bucket have a leader and all their replicas
/// again. A stream whose leader died is without one for 4 to 9 s (nats-server's election
/// timeouts), longer than the 3 s lease TTL: a host fault struck then would time the
/// cluster's election, not weir's failover.
async fn settle(js: &jetstream::Context, started: Instant) {
    let since = Instant::now();
    for stream in ["ORDERS", "ORDERS_OUT", "KV_weir-leases"] {
        while !stream_settled(js, stream).await && since.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "{:>6.1}s the cluster settled after {:.1}s",
        started.elapsed().as_secs_f64(),
        since.elapsed().as_secs_f64()
    );
}

/// Asks `stream`'s leader to step down, until one answers that it did (an election may be
/// under way).
async fn step_down(client: &async_nats::Client, stream: &str) {
    let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let response = client.request(subject.clone(), "".into()).await;
        if response.is_ok_and(|r| !String::from_utf8_lossy(&r.payload).contains("\"error\"")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("{stream}'s leader did not step down within 30 s");
}

/// Writes the orders pipeline with `partitions` partitions keyed by customer (the subject's
/// fourth token), reaching the cluster at `urls`, leases of `ttl_secs`, admin port off.
pub fn write_partitioned_orders_config(path: &Path, urls: &str, partitions: u32, ttl_secs: u64) {
    std::fs::write(path, partitioned_orders_config(urls, partitions, ttl_secs))
        .expect("write the host's weir.toml");
}

/// The orders pipeline with `partitions` partitions, at most 64 inputs a batch, leases of
/// `ttl_secs`, admin port off. With one partition it consumes `orders.in.>` as it is; with
/// several, `orders.in.*` keyed by customer (the subject's fourth token).
pub fn partitioned_orders_config(urls: &str, partitions: u32, ttl_secs: u64) -> String {
    let (subject, key) = match partitions {
        1 => ("orders.in.>", String::new()),
        _ => (
            "orders.in.*",
            "\npartition_key = \"subject-token:3\"".to_owned(),
        ),
    };
    let text = PipelineToml {
        subject,
        partitions: Some(partitions),
        extra: "[pipeline.batch]\nmax_messages = 64\n",
        ..PipelineToml::orders(urls, &plugin("orders"), Path::new("unused"))
    }
    .render()
    .replace(
        &format!("partitions = {partitions}"),
        &format!("partitions = {partitions}{key}\nlease_ttl_secs = {ttl_secs}"),
    );
    ADMIN_OFF.to_owned() + &text
}

/// The R3 input stream, partitioned `partitions` ways by customer (`orders.in.<customer>`),
/// and the R3 output stream that holds outputs, dead letters and progress markers.
pub async fn create_partitioned_orders_streams(js: &jetstream::Context, partitions: u32) {
    create_partitioned_orders_streams_of(js, partitions, 3).await;
}

/// [`create_partitioned_orders_streams`] with `replicas` replicas each (1 on a single
/// server).
pub async fn create_partitioned_orders_streams_of(
    js: &jetstream::Context,
    partitions: u32,
    replicas: usize,
) {
    js.create_stream(jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.in.*".into()],
        num_replicas: replicas,
        subject_transform: Some(jetstream::stream::SubjectTransform {
            source: "orders.in.*".into(),
            destination: format!("{{{{partition({partitions},1)}}}}.orders.in.{{{{wildcard(1)}}}}"),
        }),
        ..Default::default()
    })
    .await
    .expect("the partitioned input stream");
    js.create_stream(jetstream::stream::Config {
        num_replicas: replicas,
        ..partitioned_output_stream()
    })
    .await
    .expect("the output stream");
}

/// The orders pipeline's output stream, partitioned: outputs, dead letters and progress
/// markers on three replicas, atomic publish allowed.
pub fn partitioned_output_stream() -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: "ORDERS_OUT".into(),
        subjects: vec![
            "orders.out.>".into(),
            "orders.dlq".into(),
            "_weir.progress.orders.>".into(),
        ],
        num_replicas: 3,
        allow_atomic_publish: true,
        ..Default::default()
    }
}

/// The pid of the weir process holding `pipeline`'s lease on `partition`, by the holder
/// name in the lease bucket (`<host>/<pid>/<start>`); `None` while it is free or unreadable.
pub async fn lease_holder_pid(
    js: &jetstream::Context,
    pipeline: &str,
    partition: u32,
) -> Option<u32> {
    let bucket = js.get_key_value("weir-leases").await.ok()?;
    let entry = bucket
        .entry(format!("{pipeline}.{partition}"))
        .await
        .ok()??;
    if entry.operation != jetstream::kv::Operation::Put {
        return None;
    }
    String::from_utf8_lossy(&entry.value)
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}
