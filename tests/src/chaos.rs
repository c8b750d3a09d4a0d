//! The chaos run: a seeded workload with producer retries and malformed inputs, SIGKILLs of
//! the weir host and of nats-server at random moments while weir works, and the independent
//! verifier at the end. `weir-chaos` runs it at any size; the test suite at a small one.

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::*;

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosPlan {
    pub messages: usize,
    pub host_kills: usize,
    pub server_restarts: usize,
    pub seed: u64,
}

/// What happened, and the verifier's verdict.
#[derive(Debug)]
pub struct ChaosReport {
    pub plan: ChaosPlan,
    /// Inputs published a second time with the same `Nats-Msg-Id`, after JetStream's own
    /// duplicate window (1 s on this input stream) had closed.
    pub producer_retries: usize,
    pub verdict: OrdersVerdict,
    pub elapsed: Duration,
}

impl ChaosReport {
    /// The one-line verdict.
    pub fn line(&self) -> String {
        let v = &self.verdict;
        format!(
            "verdict: {} messages={} producer_retries={} host_kills={} server_restarts={} {} seed={} elapsed={:.1}s",
            if v.is_exact() {
                "EXACTLY-ONCE"
            } else {
                "FAILED"
            },
            self.plan.messages,
            self.producer_retries,
            self.plan.host_kills,
            self.plan.server_restarts,
            v.counts(),
            self.plan.seed,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Starts weir; its log is appended to the file `WEIR_CHAOS_LOG` names, if set.
fn start_weir(config: &Path) -> WeirProcess {
    let log = std::env::var("WEIR_CHAOS_LOG").ok();
    spawn_weir(config, log.as_deref().map(Path::new), None)
}

/// Publishes `(msg id, payload)` pairs, re-sending any chunk that fails (the server may be
/// restarting): the producer retries a real application makes, with the same ids. A chunk
/// that fails twice is re-sent on a fresh connection: after a server restart, an
/// async-nats 0.51 client sometimes stops writing publishes on its new connection (pings
/// still flow, so it never reconnects), and only a new client gets them through.
async fn publish_with_ids(url: &str, messages: &[(String, Vec<u8>)]) {
    let connect = || async {
        loop {
            match connect_client(url).await {
                Ok(client) => return jetstream::new(client),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    };
    let mut js = connect().await;
    for chunk in messages.chunks(100) {
        let mut failures = 0;
        loop {
            let mut acks = Vec::with_capacity(chunk.len());
            let mut failed = false;
            for (id, payload) in chunk {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.as_str());
                match js
                    .publish_with_headers("orders.in.new", headers, payload.clone().into())
                    .await
                {
                    Ok(ack) => acks.push(ack.into_future()),
                    Err(error) => {
                        eprintln!("publisher: {error}");
                        failed = true;
                        break;
                    }
                }
            }
            // Awaited together: each ack's timeout runs from the same start.
            for result in futures::future::join_all(acks).await {
                if let Err(error) = result {
                    eprintln!("publisher: {error}");
                    failed = true;
                }
            }
            if !failed {
                break;
            }
            failures += 1;
            if failures >= 2 {
                eprintln!("publisher: reconnecting");
                js = connect().await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(plan: ChaosPlan) -> ChaosReport {
    let started = Instant::now();
    let mut rng = SeededRng(plan.seed);
    let mut server = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    let js = server.jetstream().await;
    // A 1 s duplicate window on the input, so that producer retries published later reach
    // weir, whose msg-id dedup must absorb them.
    create_orders_stream(&js, Some(Duration::from_secs(1))).await;
    let plugin = plugin("orders");
    let store_dir = dir.path().join("store");
    let config = dir.path().join("weir.toml");
    let text = PipelineToml {
        extra: "[pipeline.batch]\nmax_messages = 64\n",
        ..PipelineToml::orders(&server.url(), &plugin, &store_dir)
    }
    .render()
    .replace("store_dir = ", "dedup = \"msg-id\"\nstore_dir = ");
    std::fs::write(&config, ADMIN_OFF.to_owned() + &text).expect("write weir.toml");

    let payloads = order_workload(plan.messages, 50);
    let messages: Vec<(String, Vec<u8>)> = payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| (format!("order-{i}"), payload.clone()))
        .collect();
    let retries: Vec<(String, Vec<u8>)> = messages.iter().step_by(50).cloned().collect();
    let producer_retries = retries.len();

    let mut weir = start_weir(&config);
    let publisher = {
        let url = server.url();
        tokio::spawn(async move {
            publish_with_ids(&url, &messages).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            publish_with_ids(&url, &retries).await;
        })
    };

    // The faults, each at a random moment after weir has made progress since the last.
    let faults = plan.host_kills + plan.server_restarts;
    let mut restarts_left = plan.server_restarts;
    let mut outputs_before = 0;
    for fault in 0..faults {
        let progressed = tokio::time::timeout(Duration::from_secs(60), async {
            while stream_len(&js, "ORDERS_OUT").await <= outputs_before {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if progressed.is_err() {
            println!("fault {fault}: no progress for 60 s; injecting anyway");
        }
        tokio::time::sleep(Duration::from_millis(rng.below(250))).await;
        let restart_server =
            restarts_left > 0 && rng.below((faults - fault) as u64) < restarts_left as u64;
        if restart_server {
            restarts_left -= 1;
            server.restart();
            println!(
                "{:>6.1}s fault {fault}: nats-server SIGKILLed and restarted",
                started.elapsed().as_secs_f64()
            );
        } else {
            weir.kill().expect("SIGKILL weir");
            weir.wait().expect("reap weir");
            weir = start_weir(&config);
            println!(
                "{:>6.1}s fault {fault}: weir SIGKILLed and restarted",
                started.elapsed().as_secs_f64()
            );
        }
        outputs_before = stream_len(&js, "ORDERS_OUT").await;
    }
    publisher.await.expect("the publisher finishes");
    println!("{:>6.1}s all published", started.elapsed().as_secs_f64());

    let verdict_now = check_orders(&js, &payloads).await;
    let (expected_outputs, expected_dead) = (
        verdict_now.expected_outputs as u64,
        verdict_now.expected_dead_letters as u64,
    );
    let drained = tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            if drained(&js, "ORDERS", "weir").await
                && stream_len(&js, "ORDERS_OUT").await >= expected_outputs
                && stream_len(&js, "ORDERS_DLQ").await >= expected_dead
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    match drained {
        Ok(()) => println!("{:>6.1}s all processed", started.elapsed().as_secs_f64()),
        Err(_) => println!("weir did not finish within 600 s of the last fault"),
    }
    let status = terminate(&mut weir);
    if !status.success() {
        println!("weir did not stop cleanly on SIGTERM: {status}");
    }
    ChaosReport {
        plan,
        producer_retries,
        verdict: check_orders(&js, &payloads).await,
        elapsed: started.elapsed(),
    }
}
