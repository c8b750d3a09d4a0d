//! Hot swap: a running weir under load is given a new plugin, by `weir plugin deploy` (a
//! partitioned pipeline) and by SIGHUP (a pipeline with a store). Every input's outputs are
//! made by exactly one of the two plugins, complete for it; in each partition's order the
//! plugin switches once, from old to new; no input runs twice. A bad candidate is refused,
//! by `deploy` before it touches anything and by the running weir, while the old plugin
//! keeps serving.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use async_nats::jetstream;
use weir_tests::*;

/// The sha256 every output and dead letter of a plugin carries.
const PLUGIN_SHA256: &str = "Weir-Plugin-Sha256";

fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// `weir plugin deploy --config <config> <candidate>`, run to its end.
fn deploy(config: &Path, candidate: &Path) -> Output {
    Command::new(weir_binary())
        .args(["plugin", "deploy", "--config"])
        .arg(config)
        .arg(candidate)
        .output()
        .expect("run weir plugin deploy")
}

fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// What the output stream holds of one input: the plugins that made its messages, and the
/// last part of their ids (`0`, `1`, …, or `dlq`).
#[derive(Debug, Default)]
struct Made {
    plugins: BTreeSet<String>,
    parts: BTreeSet<String>,
}

/// Each input's outputs and dead letters in `streams`, by input sequence, from their ids
/// (`orders:<stream>@<created>#<sequence>:<part>`).
async fn made_by_input(js: &jetstream::Context, streams: &[&str]) -> BTreeMap<u64, Made> {
    let mut made: BTreeMap<u64, Made> = BTreeMap::new();
    for stream in streams {
        for message in read_stream(js, stream).await {
            let Some(id) = message.msg_id.as_deref() else {
                continue;
            };
            let Some((input, part)) = id
                .strip_prefix("orders:")
                .and_then(|rest| rest.rsplit_once(':'))
            else {
                continue;
            };
            let sequence = input
                .rsplit_once('#')
                .and_then(|(_, sequence)| sequence.parse().ok())
                .unwrap_or_else(|| panic!("an output id names its input's sequence: {id}"));
            let entry = made.entry(sequence).or_default();
            entry.plugins.insert(
                message
                    .header(PLUGIN_SHA256)
                    .unwrap_or_else(|| panic!("{id} names no plugin"))
                    .to_owned(),
            );
            entry.parts.insert(part.to_owned());
        }
    }
    made
}

/// The parts a plugin makes of `payload`: `orders` two outputs of a valid order and a dead
/// letter of a malformed one; `hostile` echoes everything once.
fn parts_of(plugin: &str, payload: &[u8], orders: &str) -> BTreeSet<String> {
    let valid = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|order| expected_order_total(&order))
        .is_some();
    let parts: &[&str] = match (plugin == orders, valid) {
        (true, true) => &["0", "1"],
        (true, false) => &["dlq"],
        (false, _) => &["0"],
    };
    parts.iter().map(|part| (*part).to_owned()).collect()
}

/// Whether every input of `inputs` (sequence → payload) has all its messages.
fn all_made(inputs: &BTreeMap<u64, Vec<u8>>, made: &BTreeMap<u64, Made>, orders: &str) -> bool {
    inputs.iter().all(|(sequence, payload)| {
        made.get(sequence).is_some_and(|made| {
            made.plugins.len() == 1
                && made
                    .plugins
                    .iter()
                    .all(|plugin| made.parts == parts_of(plugin, payload, orders))
        })
    })
}

/// Asserts that each input's messages were made by one plugin, `old` or `new`, and are
/// complete for it, and that in each order of `orders` (the input sequences of a
/// partition) the plugin switches once, from `old` to `new`.
fn assert_switched_once(
    inputs: &BTreeMap<u64, Vec<u8>>,
    made: &BTreeMap<u64, Made>,
    orders: &[Vec<u64>],
    (old, new): (&str, &str),
) {
    for (sequence, payload) in inputs {
        let made = &made[sequence];
        assert_eq!(made.plugins.len(), 1, "input {sequence}: {made:?}");
        let plugin = made.plugins.first().expect("one plugin");
        assert!(
            plugin == old || plugin == new,
            "input {sequence} by {plugin}"
        );
        assert_eq!(
            made.parts,
            parts_of(plugin, payload, old),
            "input {sequence}"
        );
    }
    for order in orders {
        let plugins: Vec<&str> = order
            .iter()
            .map(|sequence| made[sequence].plugins.first().expect("one plugin").as_str())
            .collect();
        let switch = plugins.iter().position(|plugin| *plugin == new);
        let switch = switch.unwrap_or_else(|| panic!("the new plugin ran none of {order:?}"));
        assert!(switch > 0, "the old plugin ran none of {order:?}");
        assert!(
            plugins[switch..].iter().all(|plugin| *plugin == new),
            "after the switch at input {}, every input runs on the new plugin: {plugins:?}",
            order[switch]
        );
    }
}

/// Publishes `payloads` in the background, in chunks of 50 with a pause between them,
/// input `i` on `orders.in.c<i % 12>`.
fn publish_to_customers(
    js: &jetstream::Context,
    payloads: Vec<Vec<u8>>,
    first: usize,
) -> tokio::task::JoinHandle<()> {
    let js = js.clone();
    tokio::spawn(async move {
        for (chunk, inputs) in payloads.chunks(50).enumerate() {
            for (offset, payload) in inputs.iter().enumerate() {
                let customer = (first + chunk * 50 + offset) % 12;
                publish_all(
                    &js,
                    &format!("orders.in.c{customer}"),
                    std::slice::from_ref(payload),
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The sum of `metric`'s samples for every series of pipeline `orders` (all partitions).
async fn orders_metric_sum(admin: &str, metric: &str) -> f64 {
    let (code, text) = weir_admin::fetch(admin, "/metrics")
        .await
        .expect("the admin port answers");
    assert_eq!(code, 200);
    text.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{pipeline=\"orders")))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_under_load_switches_each_partition_once_and_a_bad_plugin_is_refused() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    cluster_chaos::create_partitioned_orders_streams_of(&js, 3, 1).await;
    let dir = tempfile::tempdir().unwrap();
    // The pipeline's own plugin file, which deploy replaces.
    let plugin_file = dir.path().join("plugin.wasm");
    std::fs::copy(plugin("orders"), &plugin_file).unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        cluster_chaos::partitioned_orders_config(&server.url(), 3, 3)
            .replace(ADMIN_OFF, &format!("[admin]\nlisten = \"{admin}\"\n"))
            .replace(
                &plugin("orders").display().to_string(),
                plugin_file.to_str().unwrap(),
            ),
    )
    .unwrap();
    let log = dir.path().join("weir.log");
    let _weir = spawn_weir(&config, Some(&log), None);
    let (old, new) = (sha256_of(&plugin("orders")), sha256_of(&plugin("hostile")));
    let payloads = order_workload(3000, 40);
    let (before, after) = payloads.split_at(1500);
    let publishing = publish_to_customers(&js, before.to_vec(), 0);
    wait_for_showing_log(
        "300 inputs processed",
        Duration::from_secs(60),
        &log,
        || async { made_by_input(&js, &["ORDERS_OUT"]).await.len() >= 300 },
    )
    .await;

    // Refused by deploy's own check: nothing changes.
    let refused = deploy(&config, &plugin("wrong-contract"));
    assert_eq!(refused.status.code(), Some(2), "{}", printed(&refused));
    assert!(
        printed(&refused).contains("cannot run as pipeline \"orders\"'s plugin"),
        "{}",
        printed(&refused)
    );
    assert_eq!(sha256_of(&plugin_file), old, "the plugin file is untouched");
    // Refused by the running weir, which keeps the old one serving.
    std::fs::copy(plugin("wrong-contract"), &plugin_file).unwrap();
    let (code, body) =
        weir_admin::post(&admin, "/reload?pipeline=orders", Duration::from_secs(120))
            .await
            .expect("the admin port answers");
    assert_eq!(code, 422, "{body}");
    let report: weir_admin::ReloadReport = serde_json::from_str(&body).unwrap();
    assert!(
        matches!(
            &report.pipelines[..],
            [weir_admin::PipelineReload { outcome: weir_admin::ReloadOutcome::Refused { reason }, .. }]
                if reason.contains("transformer@0.0.1")
        ),
        "{report:?}"
    );
    std::fs::copy(plugin("orders"), &plugin_file).unwrap();

    // Refused by the running weir after deploy's own check passed (its configuration names
    // a pipeline this weir does not run): both files are put back as they were.
    let drifted = dir.path().join("drifted.toml");
    std::fs::write(
        &drifted,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("name = \"orders\"", "name = \"orders2\""),
    )
    .unwrap();
    let refused = deploy(&drifted, &plugin("hostile"));
    assert_eq!(refused.status.code(), Some(2), "{}", printed(&refused));
    assert!(
        printed(&refused).contains(
            "the running weir refused the new plugin: this weir runs no pipeline \"orders2\""
        ),
        "{}",
        printed(&refused)
    );
    assert_eq!(sha256_of(&plugin_file), old, "the plugin file is as it was");
    assert!(
        !dir.path().join("plugin.wasm.previous").exists(),
        ".previous is as it was: absent"
    );

    // The fix, deployed while inputs flow.
    let deployed = deploy(&config, &plugin("hostile"));
    assert!(deployed.status.success(), "{}", printed(&deployed));
    assert!(
        printed(&deployed).contains("pipeline orders: swapped plugin"),
        "{}",
        printed(&deployed)
    );
    assert_eq!(sha256_of(&plugin_file), new);
    assert_eq!(sha256_of(&dir.path().join("plugin.wasm.previous")), old);
    publishing.await.unwrap();
    publish_to_customers(&js, after.to_vec(), before.len())
        .await
        .unwrap();

    let inputs: BTreeMap<u64, (String, Vec<u8>)> = read_stream(&js, "ORDERS")
        .await
        .into_iter()
        .map(|message| (message.sequence, (message.subject, message.payload)))
        .collect();
    assert_eq!(inputs.len(), payloads.len());
    let payloads: BTreeMap<u64, Vec<u8>> = inputs
        .iter()
        .map(|(sequence, (_, payload))| (*sequence, payload.clone()))
        .collect();
    wait_for_showing_log(
        "every input's outputs",
        Duration::from_secs(120),
        &log,
        || async { all_made(&payloads, &made_by_input(&js, &["ORDERS_OUT"]).await, &old) },
    )
    .await;
    // Each partition's inputs in order: the stream stores them as `<partition>.orders.in.…`.
    let mut partitions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (sequence, (subject, _)) in &inputs {
        let partition = subject.split('.').next().expect("a partition token");
        partitions.entry(partition).or_default().push(*sequence);
    }
    assert_eq!(partitions.len(), 3);
    let made = made_by_input(&js, &["ORDERS_OUT"]).await;
    assert_switched_once(
        &payloads,
        &made,
        &partitions.into_values().collect::<Vec<_>>(),
        (&old, &new),
    );
    assert_eq!(
        orders_metric_sum(&admin, "weir_inputs_executed_total").await,
        payloads.len() as f64,
        "no input ran twice"
    );
    // The diff of the new plugin against what ran: the same exactly where it ran (once
    // every input is acked, as the diff compares only those).
    for partition in 0..3 {
        wait_until_drained(&js, "ORDERS", &format!("weir-p{partition}")).await;
    }
    let by_new = made
        .values()
        .filter(|made| made.plugins.contains(&new))
        .count();
    let compared = plugin_diff(&config, &plugin("hostile"), &["--last", "3000"]);
    assert!(
        compared.contains(&format!(
            "compared 3000: {by_new} same, {} different",
            3000 - by_new
        )),
        "{compared}"
    );
    assert!(
        compared.contains(&format!("{} (", &old[..12]))
            && compared.contains(&format!("{} (", &new[..12])),
        "both live plugins are named: {compared}"
    );
    let (_, status) = weir_admin::fetch(&admin, "/status").await.unwrap();
    let status: weir_admin::StatusReport = serde_json::from_str(&status).unwrap();
    for pipeline in &status.pipelines {
        let plugin = pipeline.plugin.as_ref().expect("a plugin");
        assert_eq!(
            plugin.sha256, new,
            "{} shows the plugin it runs",
            pipeline.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_a_changed_plugin_between_batches_and_keeps_the_old_one_when_it_is_bad() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    create_orders_stream(&js, None).await;
    let dir = tempfile::tempdir().unwrap();
    let plugin_file = dir.path().join("plugin.wasm");
    std::fs::copy(plugin("orders"), &plugin_file).unwrap();
    let store = dir.path().join("store");
    let config = PipelineToml {
        extra: "[pipeline.batch]\nmax_messages = 32\n",
        ..PipelineToml::orders(&server.url(), &plugin_file, &store)
    }
    .write(dir.path(), "weir.toml");
    let log = dir.path().join("weir.log");
    let mut weir = spawn_weir(&config, Some(&log), None);
    let (old, new) = (sha256_of(&plugin("orders")), sha256_of(&plugin("hostile")));
    let payloads = order_workload(2000, 40);
    let (before, after) = payloads.split_at(1000);
    let publishing = publish_orders_spread(&js, before, Duration::from_millis(50));
    wait_for_showing_log(
        "200 inputs processed",
        Duration::from_secs(60),
        &log,
        || async {
            made_by_input(&js, &["ORDERS_OUT", "ORDERS_DLQ"])
                .await
                .len()
                >= 200
        },
    )
    .await;
    let logged = |line: &'static str| {
        let log = log.clone();
        move || {
            let log = log.clone();
            async move { std::fs::read_to_string(&log).is_ok_and(|text| text.contains(line)) }
        }
    };
    std::fs::copy(plugin("wrong-contract"), &plugin_file).unwrap();
    send_signal(&weir, libc::SIGHUP);
    wait_for_showing_log(
        "the bad plugin refused",
        Duration::from_secs(60),
        &log,
        logged("new plugin refused; the old one keeps serving"),
    )
    .await;
    std::fs::copy(plugin("hostile"), &plugin_file).unwrap();
    send_signal(&weir, libc::SIGHUP);
    wait_for_showing_log(
        "the new plugin swapped in",
        Duration::from_secs(60),
        &log,
        logged("plugin swapped"),
    )
    .await;
    publishing.await.unwrap();
    publish_orders_spread(&js, after, Duration::from_millis(50))
        .await
        .unwrap();
    let inputs: BTreeMap<u64, Vec<u8>> = read_stream(&js, "ORDERS")
        .await
        .into_iter()
        .map(|message| (message.sequence, message.payload))
        .collect();
    assert_eq!(inputs.len(), payloads.len());
    wait_for_showing_log(
        "every input's outputs",
        Duration::from_secs(120),
        &log,
        || async {
            all_made(
                &inputs,
                &made_by_input(&js, &["ORDERS_OUT", "ORDERS_DLQ"]).await,
                &old,
            )
        },
    )
    .await;
    let made = made_by_input(&js, &["ORDERS_OUT", "ORDERS_DLQ"]).await;
    let order: Vec<u64> = inputs.keys().copied().collect();
    assert_switched_once(&inputs, &made, &[order], (&old, &new));
    assert!(terminate(&mut weir).success());
    let stopped = std::fs::read_to_string(&log).unwrap();
    assert!(
        stopped.contains(&format!("executed={}", payloads.len())),
        "no input ran twice: {}",
        log_tail(&log)
    );
    // With the admin port off, deploy installs the file and says how to swap it in.
    let rolled_back = deploy(&config, &plugin("orders"));
    assert!(rolled_back.status.success(), "{}", printed(&rolled_back));
    assert!(
        printed(&rolled_back).contains("send SIGHUP to the running weir"),
        "{}",
        printed(&rolled_back)
    );
    assert_eq!(sha256_of(&plugin_file), old);
    assert_eq!(sha256_of(&dir.path().join("plugin.wasm.previous")), new);
}

/// A reload while the pipeline is still starting: each partition that loaded the old file
/// before it changed runs the reloaded plugin as soon as it serves, so that all run one;
/// a reload of the same file then changes nothing, and of another swaps every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_that_start_serving_after_a_reload_run_the_reloaded_plugin() {
    use std::sync::Arc;
    use weir_admin::ReloadOutcome;
    use weir_core::ports::PluginSlot;

    let dir = tempfile::tempdir().unwrap();
    let plugin_file = dir.path().join("plugin.wasm");
    std::fs::copy(plugin("orders"), &plugin_file).unwrap();
    let config = PipelineToml::orders(
        "nats://127.0.0.1:4222",
        &plugin_file,
        &dir.path().join("store"),
    )
    .write(dir.path(), "weir.toml");
    let config = weir::Config::load(&config).unwrap();
    let sandbox = Arc::new(
        weir_sandbox::Sandbox::new(
            config.sandbox(),
            config.largest_memory_limit(),
            weir_sandbox::Compiler::InThisProcess,
        )
        .unwrap(),
    );
    let reloader = weir::reload::Reloader::new(&config, sandbox.clone());
    let limits = config.pipelines()[0].config().limits.clone();
    // What two partitions loaded as they started, before the file changed.
    let loaded = sandbox.load(&plugin_file, &limits).unwrap();
    let (old, new) = (sha256_of(&plugin("orders")), sha256_of(&plugin("hostile")));
    std::fs::copy(plugin("hostile"), &plugin_file).unwrap();
    let outcome = |report: weir_admin::ReloadReport| {
        assert!(report.error.is_none(), "{report:?}");
        report.pipelines[0].outcome.clone()
    };
    assert_eq!(
        outcome(reloader.reload(Some("orders".into())).await),
        ReloadOutcome::Starting
    );
    let watched = || {
        let metrics = weir_core::metrics::Metrics::default().pipeline("orders");
        Arc::new(weir_admin::Watched::new("orders".into(), None, metrics))
    };
    let partitions = [
        Arc::new(PluginSlot::new(loaded.clone())),
        Arc::new(PluginSlot::new(loaded)),
    ];
    for slot in &partitions {
        reloader.serving("orders", slot.clone(), 1, watched());
        assert_eq!(
            slot.current().sha256(),
            new,
            "it serves the reloaded plugin"
        );
    }
    assert_eq!(
        outcome(reloader.reload(None).await),
        ReloadOutcome::Unchanged {
            sha256: new.clone()
        }
    );
    std::fs::copy(plugin("orders"), &plugin_file).unwrap();
    assert_eq!(
        outcome(reloader.reload(None).await),
        ReloadOutcome::Swapped {
            from: new,
            to: old.clone()
        }
    );
    for slot in &partitions {
        assert_eq!(slot.current().sha256(), old);
    }
}
