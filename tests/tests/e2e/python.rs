//! A plugin written in Python (plugins/stamp-py, built by componentize-py) runs in a real
//! pipeline on weir's deterministic WASI: its clock reads the message's data time, its random
//! bytes are seeded by the message's identity (so two independent pipelines over the same
//! input agree byte for byte), its sleep is refused, and what it prints lands in weir's log.

use std::time::Duration;

use weir_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_runs_deterministically_in_a_pipeline() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let stamp = plugin("stamp-py");
    let (first_store, second_store) = (dir.path().join("first"), dir.path().join("second"));
    // Two pipelines with their own consumers and stores read the same input stream: a replay
    // from scratch, side by side.
    let first = PipelineToml::plain("first", &url, &stamp, &first_store);
    let second = PipelineToml {
        name: "second",
        consumer: "weir-again",
        output_prefix: "again",
        output_stream: "AGAIN",
        dlq_subject: "again-dlq",
        dlq_stream: "AGAIN_DLQ",
        ..PipelineToml::plain("second", &url, &stamp, &second_store)
    };
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        ADMIN_OFF.to_owned() + &first.render() + &second.render(),
    )
    .unwrap();
    let log = dir.path().join("weir.log");
    let mut weir = spawn_weir(&config, Some(&log), None);
    wait_for_stream(&js, "AGAIN").await;

    let mut inputs: Vec<Vec<u8>> = (0..20)
        .map(|i| format!(r#"{{"user":"u{i}"}}"#).into_bytes())
        .collect();
    inputs.push(b"user=u20".to_vec());
    inputs.push(br#"{"user":"u21","sleep_s":1}"#.to_vec());
    // Printed by the plugin as it is: a bare CR, then a forged log line in red.
    inputs.push(
        br#"{"user":"u22","note":"noted\r\u001b[31mERROR weir: store record corrupt\u001b[0m"}"#
            .to_vec(),
    );
    publish_all(&js, "in.signup", &inputs).await;
    wait_for(
        "both pipelines' outputs and dead letters",
        Duration::from_secs(120),
        || async {
            stream_len(&js, "OUT").await >= 21
                && stream_len(&js, "AGAIN").await >= 21
                && stream_len(&js, "DLQ").await >= 2
                && stream_len(&js, "AGAIN_DLQ").await >= 2
        },
    )
    .await;
    let status = terminate(&mut weir);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "weir exited with {status}:\n{log_text}");

    let stored = read_stream(&js, "IN").await;
    let data_time = |user: &str| {
        stored
            .iter()
            .find(|m| String::from_utf8_lossy(&m.payload).contains(&format!("\"{user}\"")))
            .map(|m| m.stored_unix_ns)
            .unwrap_or_else(|| panic!("input of {user} not found"))
    };
    let stamps = |messages: Vec<StoredMessage>| {
        let mut stamps: Vec<(String, i128, String)> = messages
            .iter()
            .map(|m| {
                assert_eq!(m.subject.rsplit('.').next(), Some("stamped"));
                let doc: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                (
                    doc["user"].as_str().unwrap().to_owned(),
                    doc["stamped_at_ns"].as_i64().unwrap().into(),
                    doc["stamp_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        stamps.sort();
        stamps
    };
    let first_stamps = stamps(read_stream(&js, "OUT").await);
    let second_stamps = stamps(read_stream(&js, "AGAIN").await);
    assert_eq!(first_stamps.len(), 21, "{first_stamps:?}");
    assert_eq!(
        first_stamps, second_stamps,
        "a replay must stamp every input exactly as the first run did"
    );
    for (user, stamped_at_ns, _) in &first_stamps {
        assert_eq!(
            *stamped_at_ns,
            data_time(user),
            "{user}: the plugin's clock must read the input's data time"
        );
    }
    let mut ids: Vec<&str> = first_stamps.iter().map(|(_, _, id)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 21, "each input draws its own random id: {ids:?}");

    let dead = read_stream(&js, "DLQ").await;
    let reasons: Vec<(&str, &str)> = dead
        .iter()
        .map(|m| {
            (
                m.header("Weir-Dlq-Kind").unwrap_or_default(),
                m.header("Weir-Dlq-Reason").unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|(kind, reason)| *kind == "invalid-input" && reason.starts_with("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(kind, reason)| *kind == "trap" && reason.contains("waited on a clock")),
        "{reasons:?}"
    );
    // What the plugin printed to stderr, with the message it belongs to.
    let (user, _, id) = &first_stamps[0];
    assert!(
        log_text
            .lines()
            .any(|line| line.contains(&format!("stamped in.signup as {id}"))
                && line.contains("dedup_key")),
        "no log line for {user}'s stamp {id}:\n{log_text}"
    );
    // What a plugin prints reaches the log escaped: it can neither forge a line nor send
    // escape sequences to the operator's terminal.
    assert!(
        log_text.contains(r"noted\r\u{1b}[31mERROR weir: store record corrupt\u{1b}[0m"),
        "the note is not in the log, escaped:\n{log_text}"
    );
    assert!(
        !log_text.contains('\r') && !log_text.contains('\u{1b}'),
        "a raw CR or ESC reached the log:\n{log_text}"
    );
}
