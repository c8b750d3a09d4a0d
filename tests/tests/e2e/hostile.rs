//! Hostile plugins are contained: each misbehaviour becomes a dead letter with its reason,
//! and the well-behaved messages around it keep flowing.

use std::time::Duration;

use weir_core::plugin::{Call, FailureKind, Outcome, PluginOutput, TransformInput};
use weir_sandbox::LimitsConfig;
use weir_sandbox::Sandbox;
use weir_tests::*;

const LIMITS: &str = r#"
[pipeline.limits]
fuel = 50000000
memory_bytes = 16777216
deadline_ms = 10000
max_outputs = 100
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_inputs_are_dead_lettered_and_the_rest_flow() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let url = server.url();
    let (hostile, orders) = (plugin("hostile"), plugin("orders"));
    let (hostile_store, orders_store) = (dir.path().join("hostile"), dir.path().join("orders"));
    // Two pipelines in one host: the hostile one must not disturb the other.
    let hostile_pipeline = PipelineToml {
        extra: LIMITS,
        ..PipelineToml::plain("hostile", &url, &hostile, &hostile_store)
    };
    let config_path = dir.path().join("weir.toml");
    std::fs::write(
        &config_path,
        ADMIN_OFF.to_owned()
            + &hostile_pipeline.render()
            + &PipelineToml::orders(&url, &orders, &orders_store).render(),
    )
    .unwrap();
    // The pipelines start each at its own pace: wait for both streams.
    let weir = InProcessWeir::start(&config_path, &js, "ORDERS").await;
    wait_for_stream(&js, "IN").await;
    let orders = order_workload(100, 0);
    publish_all(&js, "orders.in.new", &orders[..50]).await;
    let inputs: Vec<Vec<u8>> = [
        "ok-1",
        "loop",
        "ok-2",
        "grow",
        "grow-within",
        "recurse",
        "trap",
        "partial",
        "flood",
        "bloat",
        "escape",
        "rollup",
        "big-header",
        "many-headers",
        "forge",
        "ok-3",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    publish_all(&js, "in.x", &inputs).await;
    // An input carrying a JetStream directive: copied into its dead letter as is, it would
    // make JetStream refuse the dead letter forever.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Stream", "IN");
    js.publish_with_headers("in.x", headers, "fail".into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish_all(&js, "orders.in.new", &orders[50..]).await;
    wait_for(
        "the other pipeline's outputs",
        Duration::from_secs(60),
        || async { stream_len(&js, "ORDERS_OUT").await >= 200 },
    )
    .await;
    wait_for(
        "echoes and dead letters",
        Duration::from_secs(60),
        || async { stream_len(&js, "OUT").await >= 4 && stream_len(&js, "DLQ").await >= 13 },
    )
    .await;
    weir.stop().await;

    let echoes: Vec<Vec<u8>> = read_stream(&js, "OUT")
        .await
        .into_iter()
        .map(|m| {
            assert_eq!(m.subject, "out.echo");
            m.payload
        })
        .collect();
    assert_eq!(
        echoes,
        [
            b"ok-1".to_vec(),
            b"ok-2".to_vec(),
            vec![7],
            b"ok-3".to_vec()
        ],
        "well-behaved inputs flow; nothing of `partial` is published"
    );
    let mut kinds: Vec<(String, String)> = read_stream(&js, "DLQ")
        .await
        .into_iter()
        .map(|m| {
            (
                String::from_utf8(m.payload.clone()).unwrap(),
                m.header("Weir-Dlq-Kind").unwrap().to_owned(),
            )
        })
        .collect();
    kinds.sort();
    let expected = [
        ("big-header", "output-rejected"),
        ("bloat", "output-rejected"),
        ("escape", "output-rejected"),
        ("fail", "plugin-failed"),
        ("flood", "output-rejected"),
        ("forge", "output-rejected"),
        ("grow", "memory-limit"),
        ("loop", "fuel-exhausted"),
        ("many-headers", "output-rejected"),
        ("partial", "trap"),
        ("recurse", "stack-overflow"),
        ("rollup", "output-rejected"),
        ("trap", "trap"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(kinds, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_larger_than_the_publish_window_is_published_whole() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let plugin = plugin("hostile");
    let store_dir = dir.path().join("store");
    let config_path = PipelineToml {
        extra: "[pipeline.limits]\nmax_outputs = 20000\n",
        ..PipelineToml::plain("fanout", &server.url(), &plugin, &store_dir)
    }
    .write(dir.path(), "weir.toml");
    let weir = InProcessWeir::start(&config_path, &js, "IN").await;
    // 10 000 outputs of one input: more than the 5 000 publishes JetStream lets await acks.
    publish_all(&js, "in.x", &[b"flood".to_vec()]).await;
    wait_for("the whole fan-out", Duration::from_secs(60), || async {
        stream_len(&js, "OUT").await >= 10_000
    })
    .await;
    let stats = weir.stop_stats().await;
    assert_eq!(stats.executed, 1, "{stats:?}");
    assert_eq!(stream_len(&js, "OUT").await, 10_000);
}

fn input(payload: &str) -> TransformInput {
    TransformInput {
        subject: "in.x".into(),
        headers: vec![],
        payload: payload.as_bytes().to_vec(),
        stream_sequence: 1,
        data_time_unix_ns: 0,
        dedup_key: "k".into(),
        seed: 0,
    }
}

#[test]
fn fuel_exhaustion_is_deterministic_and_the_deadline_is_a_backstop() {
    let settings = weir_sandbox::SandboxConfig::default();
    let sandbox = Sandbox::new(&settings, 16 << 20, weir_sandbox::Compiler::InThisProcess).unwrap();
    let limits = LimitsConfig {
        fuel: 5_000_000,
        memory_bytes: 16 << 20,
        ..LimitsConfig::default()
    };
    let hostile = sandbox.load(&plugin("hostile"), &limits).unwrap();
    let first = hostile.run(input("loop"));
    assert!(
        matches!(
            first,
            Outcome::Failed {
                kind: FailureKind::FuelExhausted,
                ..
            }
        ),
        "{first:?}"
    );
    assert_eq!(
        hostile.run(input("loop")),
        first,
        "same input, same outcome"
    );
    assert_eq!(
        hostile.run(input("fine")),
        Outcome::Outputs(vec![PluginOutput {
            subject: "echo".into(),
            headers: vec![],
            payload: b"fine".to_vec(),
        }]),
        "a trap in one instance does not affect the next"
    );

    // With fuel to spare, only the wall-clock deadline stops an endless loop.
    let limits = LimitsConfig {
        fuel: u64::MAX / 2,
        deadline_ms: 200,
        memory_bytes: 16 << 20,
        ..LimitsConfig::default()
    };
    let hostile = sandbox.load(&plugin("hostile"), &limits).unwrap();
    let outcome = hostile.run(input("loop"));
    assert!(
        matches!(
            outcome,
            Outcome::Failed {
                kind: FailureKind::Deadline,
                ..
            }
        ),
        "{outcome:?}"
    );
}

#[test]
fn deeply_nested_json_is_invalid_input_not_a_crash() {
    // The orders plugin parses nested JSON recursively; serde_json's own depth limit (128)
    // turns very deep nesting into invalid input before the stack runs out.
    let sandbox = Sandbox::new(
        &weir_sandbox::SandboxConfig::default(),
        64 << 20,
        weir_sandbox::Compiler::InThisProcess,
    )
    .unwrap();
    let orders = sandbox
        .load(&plugin("orders"), &LimitsConfig::default())
        .unwrap();
    let deep = "[".repeat(100_000);
    let outcome = orders.run(input(&deep));
    assert!(
        matches!(
            outcome,
            Outcome::Failed {
                kind: FailureKind::InvalidInput,
                ..
            }
        ),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spread_over_threads_comes_back_in_input_order() {
    let settings = weir_sandbox::SandboxConfig {
        threads: 3,
        ..Default::default()
    };
    let sandbox = Sandbox::new(&settings, 64 << 20, weir_sandbox::Compiler::InThisProcess).unwrap();
    let orders = sandbox
        .load(&plugin("orders"), &LimitsConfig::default())
        .unwrap();
    // Valid orders and every tenth one malformed: outcomes differ from input to input.
    let inputs: Vec<TransformInput> = order_workload(200, 10)
        .into_iter()
        .enumerate()
        .map(|(index, payload)| TransformInput {
            payload,
            stream_sequence: index as u64 + 1,
            dedup_key: format!("k{index}"),
            ..input("")
        })
        .collect();
    let (sequential, each) = (orders.clone(), inputs.clone());
    let one_by_one: Vec<Outcome> =
        tokio::task::spawn_blocking(move || each.into_iter().map(|i| sequential.run(i)).collect())
            .await
            .unwrap();
    let spread: Vec<Outcome> = orders
        .run_all(inputs.into_iter().map(Call::stateless).collect())
        .await
        .expect("no call panics")
        .into_iter()
        .map(|result| result.outcome)
        .collect();
    assert_eq!(spread, one_by_one);
    assert!(
        spread
            .iter()
            .any(|outcome| matches!(outcome, Outcome::Failed { .. })),
        "the workload has malformed inputs"
    );
}
