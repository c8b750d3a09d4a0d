//! One pipeline's plugin cannot take what another pipeline's plugin needs: a component that
//! would hold more of the engine's shared pool than a plugin is granted is refused at load,
//! with its numbers, and one that holds the most a plugin may hold leaves every other
//! pipeline's inputs alone.

use weir_core::plugin::{Outcome, TransformInput};
use weir_sandbox::{LimitsConfig, SandboxConfig};
use weir_sandbox::{LoadError, Sandbox};
use weir_tests::*;

fn write_component(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_component_needing_more_instances_and_memories_than_granted_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    // 128 core instances that each own a memory: once, such a component took every memory
    // of the shared pool, and other pipelines' valid inputs were dead-lettered as traps.
    let hog = write_component(
        dir.path(),
        "hog.wasm",
        &wat::transformer("", &wat::memory_hogs(128)),
    );
    let limits = LimitsConfig::default();
    let settings = SandboxConfig {
        compile_cache: false,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::new(
        &settings,
        limits.memory_bytes,
        weir_sandbox::Compiler::InThisProcess,
    )
    .unwrap();
    match sandbox.load(&hog, &limits) {
        Err(error @ LoadError::TooLarge { .. }) => {
            let message = error.to_string();
            assert!(message.contains("129"), "{message}");
            assert!(
                message.contains("at most 32 core instances, 2 memories"),
                "{message}"
            );
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a component of 129 core instances was loaded"),
    }

    // The same shape within the grant loads and runs.
    let fits = write_component(
        dir.path(),
        "fits.wasm",
        &wat::transformer("", &wat::memory_hogs(1)),
    );
    let plugin = sandbox
        .load(&fits, &limits)
        .expect("2 memories are granted");
    let outcome = plugin.run(TransformInput {
        subject: "in.x".into(),
        headers: Vec::new(),
        payload: b"x".to_vec(),
        stream_sequence: 1,
        data_time_unix_ns: 0,
        dedup_key: "k".into(),
        seed: 0,
    });
    assert_eq!(outcome, Outcome::Outputs(Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_holding_the_most_it_may_leaves_other_pipelines_alone() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let url = server.url();
    // Two memories and two core instances per call, and every call spins until its fuel
    // is gone: each of its instances is held as long as a plugin can hold one.
    let greedy = write_component(
        dir.path(),
        "greedy.wasm",
        &wat::transformer(wat::SPIN, &wat::memory_hogs(1)),
    );
    let orders = plugin("orders");
    let (greedy_store, orders_store) = (dir.path().join("greedy"), dir.path().join("orders"));
    let greedy_pipeline = PipelineToml {
        extra: "[pipeline.limits]\nfuel = 20000000\n",
        ..PipelineToml::plain("greedy", &url, &greedy, &greedy_store)
    };
    let config_path = dir.path().join("weir.toml");
    std::fs::write(
        &config_path,
        ADMIN_OFF.to_owned()
            + &greedy_pipeline.render()
            + &PipelineToml::orders(&url, &orders, &orders_store).render(),
    )
    .unwrap();
    let weir = InProcessWeir::start(&config_path, &js, "ORDERS").await;
    // The pipelines start each at its own pace: the greedy one's stream may come later.
    wait_for_stream(&js, "IN").await;
    let spins: Vec<Vec<u8>> = (0..64).map(|i| format!("spin-{i}").into_bytes()).collect();
    publish_all(&js, "in.x", &spins).await;
    let payloads = order_workload(300, 0);
    publish_all(&js, "orders.in.new", &payloads).await;
    wait_until_drained(&js, "ORDERS", "weir").await;
    wait_until_drained(&js, "IN", "weir").await;
    weir.stop().await;

    verify_orders_exactly_once(&js, &payloads).await;
    assert_eq!(
        stream_len(&js, "ORDERS_DLQ").await,
        0,
        "no valid order is dead-lettered for what another plugin holds"
    );
    let letters = read_stream(&js, "DLQ").await;
    assert_eq!(letters.len(), 64);
    assert!(
        letters
            .iter()
            .all(|letter| letter.header("Weir-Dlq-Kind") == Some("fuel-exhausted")),
        "the greedy plugin's own inputs fail as what they are"
    );
}

/// Load errors say what is wrong: an import only shaped like WASI is an import weir does not
/// provide (it was reported as an export "with a different shape"), and an export whose
/// types differ from the contract is a mismatch (it was reported as a limit).
#[test]
fn load_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let limits = LimitsConfig::default();
    let settings = SandboxConfig {
        compile_cache: false,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::new(
        &settings,
        limits.memory_bytes,
        weir_sandbox::Compiler::InThisProcess,
    )
    .unwrap();

    let backdoor = wat::transformer(
        "",
        r#"(import "wasi:evil/backdoor@0.2.0" (instance (export "open" (func))))"#,
    );
    let path = write_component(dir.path(), "backdoor.wasm", &backdoor);
    match sandbox.load(&path, &limits) {
        Err(error @ LoadError::Imports { .. }) => {
            assert!(
                error.to_string().contains("wasi:evil/backdoor@0.2.0"),
                "{error}"
            )
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("an unknown import was accepted"),
    }

    // `output` without its headers: the same core signature, another contract.
    let text = wat::transformer_text("", "").replace(
        r#"(type $output (record
    (field "subject" string) (field "headers" $headers) (field "payload" $bytes)))"#,
        r#"(type $output (record (field "subject" string) (field "payload" $bytes)))"#,
    );
    let path = write_component(dir.path(), "mismatch.wasm", &wat::assemble(&text));
    match sandbox.load(&path, &limits) {
        Err(error @ LoadError::Mismatch { .. }) => {
            assert!(error.to_string().contains("different shape"), "{error}")
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("an export of another shape was accepted"),
    }
}

/// A component weir refuses leaves nothing compiled behind, in the process or in the compile
/// cache on disk (the cache once kept every refused component).
#[test]
fn a_refused_component_is_not_kept_in_the_compile_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let limits = LimitsConfig::default();
    let settings = SandboxConfig {
        compile_cache_dir: Some(cache.clone()),
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::new(
        &settings,
        limits.memory_bytes,
        weir_sandbox::Compiler::InThisProcess,
    )
    .unwrap();
    let entries = || {
        std::fs::read_dir(&cache)
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    let backdoor = wat::transformer(
        "",
        r#"(import "wasi:evil/backdoor@0.2.0" (instance (export "open" (func))))"#,
    );
    let refused = write_component(dir.path(), "backdoor.wasm", &backdoor);
    assert!(sandbox.load(&refused, &limits).is_err());
    assert_eq!(entries(), 0, "the refused component left a cache entry");
    // A component weir runs is kept, as before.
    let fine = write_component(dir.path(), "fine.wasm", &wat::transformer("", ""));
    sandbox
        .load(&fine, &limits)
        .expect("a plain transformer loads");
    assert_eq!(entries(), 1);
}
