//! W3C trace context through weir: an input's `traceparent` reaches every output it produces
//! as a child span derived from the input (so that a re-publish is byte-identical), its
//! `tracestate` goes along, and weir's JSON log names the trace of the input it speaks of.

use std::process::Stdio;
use std::time::Duration;

use weir_core::trace::TraceContext;
use weir_tests::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const DEAD_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_carry_their_inputs_trace_and_the_log_names_it() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin("orders");
    let store = dir.path().join("store");
    let config =
        PipelineToml::orders(&server.url(), &plugin, &store).write(dir.path(), "weir.toml");
    create_orders_stream(&js, None).await;
    let log = dir.path().join("weir.log");
    let mut weir = WeirProcess::from(
        std::process::Command::new(weir_binary())
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start weir"),
    );

    let orders = order_workload(6, 6);
    let publish = async |payload: &[u8], traceparent: String, tracestate: Option<&str>| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", traceparent.as_str());
        if let Some(state) = tracestate {
            headers.insert("tracestate", state);
        }
        js.publish_with_headers("orders.in.new", headers, payload.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    };
    // A valid order with a trace, a malformed one with another, and one with a traceparent
    // that is not one (ignored, as the W3C asks of a receiver).
    publish(
        &orders[0],
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01"),
        Some("congo=t61rcWkgMzE"),
    )
    .await;
    let dead_sequence = publish(
        &orders[5],
        format!("00-{DEAD_TRACE_ID}-b7ad6b7169203331-00"),
        None,
    )
    .await;
    publish(&orders[1], "not-a-traceparent".into(), None).await;
    wait_for(
        "the outputs and the dead letter",
        Duration::from_secs(60),
        || async {
            stream_len(&js, "ORDERS_OUT").await >= 4 && stream_len(&js, "ORDERS_DLQ").await >= 1
        },
    )
    .await;

    let outputs = read_stream(&js, "ORDERS_OUT").await;
    assert_eq!(outputs.len(), 4);
    for (output, traced) in outputs.iter().zip([true, true, false, false]) {
        // Msg-Id: <pipeline>:<dedup key>:<index>.
        let msg_id = output.msg_id.as_deref().unwrap();
        let (rest, index) = msg_id.rsplit_once(':').unwrap();
        let dedup_key = rest.split_once(':').unwrap().1;
        let index: usize = index.parse().unwrap();
        if traced {
            let span_id = TraceContext::child_span_id(dedup_key, index);
            assert_eq!(
                output.header("traceparent"),
                Some(format!("00-{TRACE_ID}-{span_id}-01").as_str()),
                "{msg_id}"
            );
            assert_eq!(output.header("tracestate"), Some("congo=t61rcWkgMzE"));
        } else {
            // The input's invalid traceparent is not carried into its outputs.
            assert_eq!(output.header("traceparent"), None, "{msg_id}");
        }
    }

    assert!(terminate(&mut weir).success());
    let log = std::fs::read_to_string(&log).unwrap();
    let dead_lettered: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["fields"]["message"] == "input dead-lettered")
        .collect();
    assert_eq!(dead_lettered.len(), 1, "{log}");
    let span = &dead_lettered[0]["span"];
    assert_eq!(span["name"], "message");
    assert_eq!(span["trace_id"], DEAD_TRACE_ID);
    assert_eq!(span["messaging.system"], "nats");
    assert_eq!(span["messaging.destination.name"], "orders.in.new");
    assert_eq!(span["messaging.consumer.group.name"], "weir");
    assert_eq!(span["messaging.nats.stream"], "ORDERS");
    assert_eq!(span["messaging.nats.stream_sequence"], dead_sequence);
}
