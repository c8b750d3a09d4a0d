//! Poison inputs of the stream's own: header blocks nats-server stores and delivers but the
//! client cannot read (invalid UTF-8, a non-ASCII name, a line without a colon, a name with a
//! space). Each is dead-lettered once as `unreadable-input` with its block, then acked; the
//! connection and every other input go on. Once, each such delivery dropped weir's
//! connection, the input was redelivered forever, and a thousand of them stopped the pipeline.

use std::time::Duration;

use weir_tests::*;

/// The header blocks async-nats 0.51 cannot parse, by what is wrong with them.
fn unreadable_blocks() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "invalid UTF-8",
            b"NATS/1.0\r\nX-Note: \xff\xfe\r\n\r\n".to_vec(),
        ),
        (
            "non-ASCII name",
            "NATS/1.0\r\nNäme: v\r\n\r\n".as_bytes().to_vec(),
        ),
        ("no colon", b"NATS/1.0\r\nno colon here\r\n\r\n".to_vec()),
        (
            "name with a space",
            b"NATS/1.0\r\nBad Name: v\r\n\r\n".to_vec(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_with_unreadable_headers_are_dead_lettered_once_and_nothing_else_waits() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    let orders = plugin("orders");
    // ack_wait well past the test: nothing may depend on a redelivery.
    let config = PipelineToml::orders(&server.url(), &orders, &dir.path().join("store"))
        .write(dir.path(), "weir.toml");
    let config_text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("ack_wait_ms = 2000", "ack_wait_ms = 600000");
    std::fs::write(&config, config_text).unwrap();
    let log = dir.path().join("weir.log");
    let mut weir = spawn_weir(&config, Some(&log), None);
    wait_for_stream(&js, "ORDERS").await;

    // 1 000 poison inputs, as many as the consumer's default unacked limit, between two
    // halves of a workload of normal orders.
    let before = order_workload(300, 0);
    let after: Vec<Vec<u8>> = order_workload(600, 0).split_off(300);
    publish_all(&js, "orders.in.new", &before).await;
    let blocks = unreadable_blocks();
    let poison: Vec<(&str, Vec<u8>, Vec<u8>)> = (0..1000)
        .map(|i| {
            let (_, block) = &blocks[i % blocks.len()];
            (
                "orders.in.new",
                block.clone(),
                format!("poison-{i}").into_bytes(),
            )
        })
        .collect();
    publish_raw(server.port(), &poison);
    publish_all(&js, "orders.in.new", &after).await;

    let mut payloads = [before, after].concat();
    payloads.extend(poison.iter().map(|(_, _, payload)| payload.clone()));
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(90)).await;
    let status = terminate(&mut weir);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}\n{log_text}");

    // Every order exactly once; every poison input in the DLQ exactly once (by payload).
    verify_orders_exactly_once(&js, &payloads).await;
    let letters = read_stream(&js, "ORDERS_DLQ").await;
    for letter in &letters {
        let payload = String::from_utf8_lossy(&letter.payload).into_owned();
        let i: usize = payload
            .strip_prefix("poison-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("an unexpected dead letter: {payload}"));
        let (what, block) = &blocks[i % blocks.len()];
        assert_eq!(
            letter.header("Weir-Dlq-Kind"),
            Some("unreadable-input"),
            "{what}"
        );
        let reason = letter.header("Weir-Dlq-Reason").unwrap_or_default();
        assert!(
            reason.starts_with("its header block cannot be read: "),
            "{what}: {reason}"
        );
        let kept = letter.header("Weir-Dlq-Input-Header-Block").map(|encoded| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap()
        });
        assert_eq!(
            kept.as_ref(),
            Some(block),
            "{what}: the block is kept as stored"
        );
    }
    // The connection was never dropped, and the log names each poison input's sequence.
    assert!(
        !log_text.contains("disconnected"),
        "weir's connection dropped:\n{log_text}"
    );
    let named = log_text
        .lines()
        .filter(|line| {
            line.contains("an input's header block cannot be read")
                && line.contains("stream_sequence=")
        })
        .count();
    assert_eq!(named, 1000, "{log_text}");

    // `weir dlq show` prints the block, escaped; `replay` will not re-publish such a letter
    // without its headers, and says what to do instead.
    let dlq = |args: &[&str]| {
        std::process::Command::new(weir_binary())
            .arg("dlq")
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "off")
            .output()
            .unwrap()
    };
    let shown = dlq(&["show", "1"]);
    let shown_text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{shown_text}");
    assert!(shown_text.contains("header block:"), "{shown_text}");
    assert!(shown_text.contains(r"NATS/1.0\r\n"), "{shown_text}");
    let replayed = dlq(&["replay", "1"]);
    let replay_text = String::from_utf8_lossy(&replayed.stdout).into_owned()
        + &String::from_utf8_lossy(&replayed.stderr);
    assert_eq!(replayed.status.code(), Some(1), "{replay_text}");
    assert!(
        replay_text.contains("have its producer publish it again with valid headers"),
        "{replay_text}"
    );
    assert_eq!(
        stream_len(&js, "ORDERS_DLQ").await,
        1000,
        "the letter stays in the DLQ"
    );
}
