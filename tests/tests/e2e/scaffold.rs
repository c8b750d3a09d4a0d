//! `weir plugin new` (stateless, and `--stateful`) makes a crate that passes its own native
//! tests, `weir plugin build` turns it into a component weir runs (for wasm32-wasip2 and for
//! wasm32-unknown-unknown), and the component passes its golden fixtures and a fuzz run.

use std::path::Path;
use std::process::{Command, Output};

use weir_tests::*;

fn run(command: &mut Command) -> Output {
    let output = command.output().expect("start the command");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn a_new_plugin_builds_and_passes_its_tests() {
    new_plugin_builds_and_passes_its_tests("greeter", &[]);
}

#[test]
fn a_new_stateful_plugin_builds_and_passes_its_tests() {
    new_plugin_builds_and_passes_its_tests("totals", &["--stateful"]);
}

fn new_plugin_builds_and_passes_its_tests(name: &str, flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let weir = weir_binary();
    run(Command::new(&weir)
        .args(["plugin", "new", name, "--dir"])
        .arg(dir.path())
        .args(flags));
    let crate_dir = dir.path().join(name);
    // A target directory that outlives the test keeps the dependencies built between runs
    // (and between the two scaffolds, which cargo's lock on it takes in turn).
    let target_dir = weir
        .parent()
        .and_then(Path::parent)
        .expect("weir lives in <target>/<profile>")
        .join("scaffold");
    let cargo = std::env::var_os("CARGO").unwrap_or("cargo".into());
    let output = run(Command::new(&cargo)
        .arg("test")
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", &target_dir));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("test result: ok. 2 passed"),
        "the native unit tests: {report}"
    );

    // The standard target, and wasm32-unknown-unknown linked into a component.
    for target in ["wasm32-wasip2", "wasm32-unknown-unknown"] {
        let output = run(Command::new(&weir)
            .args(["plugin", "build", "--target", target])
            .arg(&crate_dir)
            .env("CARGO_TARGET_DIR", &target_dir));
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            report.contains("exports:  weir:transform/transformer@0.2.0"),
            "{target}: {report}"
        );
        // Only weir's own interfaces: a no_std plugin imports no WASI.
        assert!(!report.contains("wasi:"), "{target}: {report}");
        assert!(report.contains("runnable: yes"), "{target}: {report}");
        let component = target_dir
            .join(target)
            .join("release")
            .join(format!("{name}.wasm"));

        let output = run(Command::new(&weir)
            .args(["plugin", "test"])
            .arg(&component)
            .arg("--fixtures")
            .arg(crate_dir.join("fixtures"))
            .args(["--fuzz", "500"]));
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            report.contains("2 passed, 0 failed, 0 updated"),
            "{target}: {report}"
        );
        assert!(
            report.contains("fuzz: 500 generated inputs (--seed 1), 0 misbehaved"),
            "{target}: {report}"
        );
    }
}

#[test]
fn fuzzing_finds_inputs_that_make_a_plugin_trap() {
    let fixtures = repo_root().join("plugins/hostile/fixtures");
    let output = Command::new(weir_binary())
        .args(["plugin", "test"])
        .arg(plugin("hostile"))
        .arg("--fixtures")
        .arg(&fixtures)
        .args(["--fuel", "10000000", "--fuzz", "300", "--seed", "7"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{report}");
    assert!(report.contains("misbehaved"), "{report}");
    assert!(report.contains("as a fixture:"), "{report}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("generated inputs made the plugin trap"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
