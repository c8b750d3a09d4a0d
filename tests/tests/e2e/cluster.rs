//! One weir on a 3-node cluster (R3 streams) fed by a steady producer, while nodes die: the
//! leader of weir's consumer, then of the output stream, then of the input stream, each
//! node started again and caught up before the next kill. After each kill, weir's outputs
//! resume within seconds of the new leaders' election: they resumed 12 s after it in 4 of 6
//! kills (a missed pull heartbeat, then a JetStream request waiting out its timeout). The
//! test prints the figures; at the end, every output is there exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use weir_tests::*;

/// The longest weir may take, after the last leader is elected, to store a new output. The
/// target is 2 s; the bound leaves room for a loaded machine, and fails the 10 s waits.
const RESUME_BOUND: Duration = Duration::from_secs(4);

/// Which leader a kill takes down.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Consumer,
    OutputStream,
    InputStream,
}

/// The node names (`n0`…) leading the input stream, weir's consumer and the output stream,
/// and whether each has both its other replicas current; `None` while any of them has no
/// leader or does not answer.
async fn leaders(js: &jetstream::Context) -> Option<([String; 3], bool)> {
    let input = js.get_stream("ORDERS").await.ok()?;
    let consumer = input.consumer_info("weir").await.ok()?.cluster.clone()?;
    let output = js.get_stream("ORDERS_OUT").await.ok()?;
    let groups = [
        input.cached_info().cluster.clone()?,
        consumer,
        output.cached_info().cluster.clone()?,
    ];
    let replicated = groups.iter().all(|group| {
        group.replicas.len() == 2
            && group
                .replicas
                .iter()
                .all(|peer| peer.current && !peer.offline)
    });
    let [input, consumer, output] = groups;
    Some((
        [input.leader?, consumer.leader?, output.leader?],
        replicated,
    ))
}

/// The output stream's last sequence, if it answers.
async fn outputs_stored(js: &jetstream::Context) -> Option<u64> {
    let output = js.get_stream("ORDERS_OUT").await.ok()?;
    Some(output.cached_info().state.last_sequence)
}

/// A JetStream context on every node that gives up on a request after half a second, so
/// that polling sees an election as it ends rather than a timeout later.
async fn observer(cluster: &NatsCluster) -> jetstream::Context {
    let urls: Vec<String> = (0..3).map(|node| cluster.url(node)).collect();
    let client = async_nats::ConnectOptions::new()
        .connect(urls)
        .await
        .expect("connect to the cluster");
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_millis(500));
    js
}

/// Publishes orders one after another until `stop`, each with its own `Nats-Msg-Id`, re-sent
/// until JetStream acknowledges it (as a real producer does through an election). Returns
/// the payloads published.
async fn produce(js: jetstream::Context, stop: Arc<AtomicBool>) -> Vec<Vec<u8>> {
    let workload = order_workload(100_000, 0);
    let mut published = Vec::new();
    for (index, payload) in workload.into_iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("order-{index}").as_str());
            let sent = js
                .publish_with_headers("orders.in.new", headers, payload.clone().into())
                .await;
            let acked = match sent {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if acked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        published.push(payload);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    published
}

/// Polls `probe` every 20 ms until it gives a value; panics with `what` after a minute.
async fn poll<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_resume_within_seconds_of_the_election_after_a_leader_dies() {
    let mut cluster = NatsCluster::start().await;
    let js = observer(&cluster).await;
    for (name, subject) in [
        ("ORDERS", "orders.in.>"),
        ("ORDERS_OUT", "orders.out.>"),
        ("ORDERS_DLQ", "orders.dlq"),
    ] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("create an R3 stream");
    }
    let dir = tempfile::tempdir().unwrap();
    let urls = cluster.urls();
    let plugin = plugin("orders");
    let config = PipelineToml::orders(&urls, &plugin, &dir.path().join("store"))
        .write(dir.path(), "weir.toml");
    let log = dir.path().join("weir.log");
    let mut weir = spawn_weir(&config, Some(&log), None);
    let weir_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(produce(observer(&cluster).await, stop.clone()));
    for victim in [Victim::Consumer, Victim::OutputStream, Victim::InputStream] {
        // Steady state: every leader in place with its replicas current (a restarted node
        // caught up), outputs flowing.
        let leaders_before = poll("replicated leaders and flowing outputs", || async {
            let earlier = outputs_stored(&js).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (leaders, replicated) = leaders(&js).await?;
            (replicated && outputs_stored(&js).await? > earlier).then_some(leaders)
        })
        .await;
        let index = match victim {
            Victim::InputStream => 0,
            Victim::Consumer => 1,
            Victim::OutputStream => 2,
        };
        let dead = leaders_before[index].clone();
        let node: usize = dead.trim_start_matches('n').parse().unwrap();
        let killed = Instant::now();
        cluster.kill(node);

        // The election: every leader answers again, none on the dead node.
        let stored_at_election = poll("new leaders", || async {
            let (leaders, _) = leaders(&js).await?;
            let stored = outputs_stored(&js).await?;
            (!leaders.contains(&dead)).then_some(stored)
        })
        .await;
        let elected = Instant::now();
        poll("outputs after the election", || async {
            let stored = outputs_stored(&js).await?;
            (stored > stored_at_election).then_some(())
        })
        .await;
        let resumed = elected.elapsed();
        println!(
            "{victim:?} leader {dead} killed: new leaders after {:.1} s, outputs {:.2} s after that",
            (elected - killed).as_secs_f64(),
            resumed.as_secs_f64()
        );
        assert!(
            resumed < RESUME_BOUND,
            "{victim:?} leader killed: outputs resumed {resumed:?} after the election\n{}",
            weir_log()
        );
        cluster.restart(node).await;
    }
    stop.store(true, Ordering::SeqCst);
    let payloads = producer.await.unwrap();
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(120)).await;
    assert!(terminate(&mut weir).success(), "{}", weir_log());
    verify_orders_exactly_once(&js, &payloads).await;
}
