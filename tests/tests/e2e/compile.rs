//! Compile bombs: components that are small but take cranelift minutes and gigabytes. weir
//! refuses what it can measure before compiling (size, function count, largest function
//! body) and compiles the rest in a child process held to a deadline and a memory limit,
//! each refusal with its number; one pipeline's compilation delays no other pipeline, the
//! compiler dies with weir, and nothing of a refused component stays in the compile cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use weir_tests::*;

fn write_component(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `weir plugin inspect` on a component: its exit code and stderr.
fn inspect(component: &Path, cache: &Path) -> (Option<i32>, String) {
    let output = Command::new(weir_binary())
        .args(["plugin", "inspect"])
        .arg(component)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The entries of a compile cache directory (none if it was never created).
fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|entry| entry.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A `[sandbox]` table with its own compile cache and `settings`.
fn sandbox_table(cache: &Path, settings: &str) -> String {
    format!(
        "{ADMIN_OFF}[sandbox]\ncompile_cache_dir = {:?}\n{settings}\n",
        cache.display().to_string()
    )
}

/// Writes `component` and a configuration of one pipeline running it, whose server is never
/// reached (the plugin is loaded first), with `[sandbox]` `settings` and a compile cache of
/// its own. Returns the configuration and the cache directory.
fn unreached_pipeline(dir: &Path, component: &[u8], settings: &str) -> (PathBuf, PathBuf) {
    let (config, cache, store) = (dir.join("weir.toml"), dir.join("cache"), dir.join("store"));
    let component = write_component(dir, "bomb.wasm", component);
    let pipeline = PipelineToml::plain("bomb", "nats://127.0.0.1:1", &component, &store);
    std::fs::write(
        &config,
        sandbox_table(&cache, settings) + &pipeline.render(),
    )
    .unwrap();
    (config, cache)
}

#[test]
fn components_past_the_measured_limits_are_refused_before_compiling_with_their_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cases = [
        (
            "many-functions.wasm",
            wat::many_functions(100_001),
            "it has 100003 functions, more than sandbox.max_functions = 100000",
        ),
        (
            "huge-function.wasm",
            wat::slow_to_compile(10_000, 120_000),
            "more than sandbox.max_function_bytes = 1048576",
        ),
        (
            "huge-file.wasm",
            wat::padded(wat::transformer("", ""), 64 << 20),
            "more than sandbox.max_component_bytes = 67108864",
        ),
    ];
    for (name, bytes, expected) in cases {
        let component = write_component(dir.path(), name, &bytes);
        let (code, stderr) = inspect(&component, &cache);
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains("is more than weir agrees to compile"),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
    assert_eq!(
        cache_entries(&cache.join("weir/compiled")),
        Vec::<PathBuf>::new()
    );
}

#[test]
fn compiling_past_the_memory_limit_is_refused_with_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    // About 100 MiB to compile.
    let bomb = wat::slow_to_compile(2_000, 50_000);
    let (config, cache) = unreached_pipeline(dir.path(), &bomb, "compile_memory_bytes = 67108864");
    let output = Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "compiling it needed more than sandbox.compile_memory_bytes = 67108864 bytes of memory"
        ),
        "{stderr}"
    );
    assert_eq!(cache_entries(&cache), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_bomb_is_stopped_at_its_deadline_and_delays_no_other_pipeline() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // Past a minute to compile here: far past its deadline on any machine.
    let bomb = write_component(
        dir.path(),
        "bomb.wasm",
        &wat::slow_to_compile(10_000, 90_000),
    );
    let orders = plugin("orders");
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        sandbox_table(&cache, "compile_timeout_ms = 20000")
            + &PipelineToml::plain("bomb", &url, &bomb, &dir.path().join("bomb")).render()
            + &PipelineToml::orders(&url, &orders, &dir.path().join("orders")).render(),
    )
    .unwrap();
    let mut weir = tokio::process::Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "off")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let payloads = order_workload(50, 0);
    wait_for_stream(&js, "ORDERS").await;
    publish_all(&js, "orders.in.new", &payloads).await;
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(60)).await;
    assert!(
        weir.try_wait().unwrap().is_none(),
        "the orders pipeline ran while the bomb was still compiling"
    );
    let status = tokio::time::timeout(Duration::from_secs(120), weir.wait())
        .await
        .expect("weir stops the compiler at its deadline")
        .unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut weir.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("pipeline \"bomb\"")
            && stderr.contains("compiling it took longer than sandbox.compile_timeout_ms = 20000"),
        "{stderr}"
    );
    verify_orders_exactly_once(&js, &payloads).await;
    // The orders plugin is cached; nothing of the bomb is.
    let entries = cache_entries(&cache);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let orders_sha = weir_core::plugin::sha256_hex(&std::fs::read(&orders).unwrap());
    assert!(
        entries[0].to_string_lossy().contains(&orders_sha),
        "{entries:?}"
    );
}

/// The processes whose parent is `parent` and whose command line contains `needle`.
fn children_running(parent: u32, needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …: the command name may hold spaces, so after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// Stopped while it compiles a bomb, weir exits at once (SIGTERM: cleanly) and its compiler
/// process dies with it (SIGKILL too): it once waited for the compile's deadline.
#[tokio::test]
async fn weir_stops_at_once_while_compiling_and_its_compiler_dies_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = wat::slow_to_compile(10_000, 90_000);
    let (config, _cache) = unreached_pipeline(dir.path(), &bomb, "");
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut weir = std::process::Command::new(weir_binary())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "off")
            .spawn()
            .unwrap();
        let mut compiler = Vec::new();
        wait_for("weir's compiler process", Duration::from_secs(30), || {
            compiler = children_running(weir.id(), "compile-component");
            std::future::ready(!compiler.is_empty())
        })
        .await;
        send_signal(&weir, signal);
        // Well before the bomb compiles (past a minute) or reaches its deadline (120 s).
        let status = wait_for_exit(&mut weir, Duration::from_secs(30)).await;
        if signal == libc::SIGTERM {
            assert!(status.success(), "{status}");
        }
        // Gone, or a zombie waiting for whoever adopted it to reap it.
        let dead = |pid: u32| match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        };
        wait_for(
            "the compiler to die with weir",
            Duration::from_secs(10),
            || std::future::ready(dead(compiler[0])),
        )
        .await;
    }
}
