//! Property: whatever messages arrive (arbitrary subjects, headers, payload bytes, sizes up
//! to the server's max payload), the host does not crash and loses nothing: every input ends
//! up exactly once either transformed (echoed) or in the DLQ with a reason.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use weir_tests::*;

#[derive(Debug, Clone)]
struct Input {
    subject: String,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

fn input_strategy(max_payload: usize) -> impl Strategy<Value = Input> {
    let token = "[a-zA-Z0-9_-]{1,8}";
    let subject =
        proptest::collection::vec(token, 1..4).prop_map(|t| format!("in.{}", t.join(".")));
    // Header names: visible ASCII without ':'; values: anything printable on one line.
    let header = ("[!-9;-~]{1,16}", "[ -~]{0,32}");
    let headers = proptest::collection::vec(header, 0..8);
    let payload = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..512),
        1 => proptest::collection::vec(any::<u8>(), (max_payload - 4096)..(max_payload - 1024)),
    ];
    (subject, headers, payload).prop_map(|(subject, headers, payload)| Input {
        subject,
        headers,
        payload,
    })
}

#[test]
fn arbitrary_messages_never_crash_the_host_nor_get_lost() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin("hostile");
    let store_dir = dir.path().join("store");
    let config_path = PipelineToml::plain("prop", &server.url(), &plugin, &store_dir)
        .write(dir.path(), "weir.toml");
    let (js, max_payload, weir) = runtime.block_on(async {
        let client = server.client().await;
        let max_payload = client.server_info().max_payload;
        let js = async_nats::jetstream::new(client);
        let weir = InProcessWeir::start(&config_path, &js, "IN").await;
        (js, max_payload, weir)
    });

    let published = std::cell::Cell::new(0u64);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    });
    let strategy = proptest::collection::vec(input_strategy(max_payload), 1..12);
    runner
        .run(&strategy, |inputs| {
            runtime.block_on(async {
                for input in &inputs {
                    let mut headers = async_nats::HeaderMap::new();
                    for (name, value) in &input.headers {
                        headers.append(name.as_str(), value.as_str());
                    }
                    js.publish_with_headers(
                        input.subject.clone(),
                        headers,
                        input.payload.clone().into(),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                }
                published.set(published.get() + inputs.len() as u64);
                let target = published.get();
                wait_for(
                    "every input accounted for",
                    Duration::from_secs(60),
                    || async {
                        stream_len(&js, "OUT").await + stream_len(&js, "DLQ").await >= target
                    },
                )
                .await;
            });
            Ok(())
        })
        .unwrap();

    runtime.block_on(async {
        weir.stop().await;
        let inputs = read_stream(&js, "IN").await;
        let published = published.get();
        assert_eq!(inputs.len() as u64, published);
        // Every input sequence: exactly one echo with its payload, or exactly one dead letter.
        let mut accounted: HashMap<u64, &'static str> = HashMap::new();
        for output in read_stream(&js, "OUT").await {
            let id = output.msg_id.clone().unwrap();
            let sequence: u64 = id
                .rsplit('#')
                .next()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(
                output.payload,
                inputs[sequence as usize - 1].payload,
                "echo of {sequence}"
            );
            assert!(
                accounted.insert(sequence, "echo").is_none(),
                "input {sequence} twice"
            );
        }
        for letter in read_stream(&js, "DLQ").await {
            let sequence: u64 = letter
                .header("Weir-Input-Sequence")
                .unwrap()
                .parse()
                .unwrap();
            assert!(!letter.header("Weir-Dlq-Reason").unwrap().is_empty());
            assert!(
                accounted.insert(sequence, "dlq").is_none(),
                "input {sequence} twice"
            );
        }
        assert_eq!(
            accounted.len() as u64,
            published,
            "every input accounted for exactly once"
        );
    });
}
