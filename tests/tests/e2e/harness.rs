//! `weir plugin test` and `weir plugin inspect`: golden fixtures pass, a wrong expectation
//! fails with a readable diff, `--update` rewrites it, and inspect says what a file is.

use std::process::{Command, Output};

use weir_tests::*;

fn weir(args: &[&str]) -> Output {
    Command::new(weir_binary()).args(args).output().unwrap()
}

fn text_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `weir plugin test` on one of the repository's plugins with its own fixtures, and the report.
fn test_with_own_fixtures(name: &str) -> (Output, String) {
    let fixtures = repo_root().join("plugins").join(name).join("fixtures");
    let output = weir(&[
        "plugin",
        "test",
        plugin(name).to_str().unwrap(),
        "--fixtures",
        fixtures.to_str().unwrap(),
    ]);
    let report = text_of(&output);
    (output, report)
}

#[test]
fn fixtures_pass_fail_with_a_diff_and_update() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = repo_root().join("plugins/orders/fixtures");
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let orders = plugin("orders");
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut args = vec![
            "plugin".to_owned(),
            "test".into(),
            orders.display().to_string(),
            "--fixtures".into(),
            dir.path().display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let run = |extra: &[&'static str]| {
        let args = args(extra);
        weir(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let output = run(&[]);
    assert!(output.status.success(), "{}", text_of(&output));
    assert!(
        text_of(&output).contains("4 passed, 0 failed"),
        "{}",
        text_of(&output)
    );

    // A wrong expectation: the total is 1299, the fixture now says 1300.
    let case = dir.path().join("two-items.json");
    let original = std::fs::read_to_string(&case).unwrap();
    std::fs::write(
        &case,
        original.replace("\"total_cents\": 1299", "\"total_cents\": 1300"),
    )
    .unwrap();
    let output = run(&[]);
    let report = text_of(&output);
    assert_eq!(output.status.code(), Some(2), "{report}");
    assert!(report.contains("FAIL             two-items"), "{report}");
    let marked = |mark: char, line: &str| {
        report.lines().any(|l| {
            l.trim_start()
                .strip_prefix(mark)
                .is_some_and(|rest| rest.trim() == line)
        })
    };
    assert!(marked('-', "\"total_cents\": 1300"), "{report}");
    assert!(marked('+', "\"total_cents\": 1299"), "{report}");
    assert!(report.contains("3 passed, 1 failed"), "{report}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 of 4 fixtures failed"));

    let output = run(&["--update"]);
    assert!(output.status.success(), "{}", text_of(&output));
    assert_eq!(
        std::fs::read_to_string(&case).unwrap(),
        original,
        "--update restores the truth"
    );
}

#[test]
fn inspect_tells_what_a_component_is_and_whether_weir_runs_it() {
    let output = weir(&["plugin", "inspect", plugin("orders").to_str().unwrap()]);
    let report = text_of(&output);
    assert!(output.status.success(), "{report}");
    assert!(
        report.contains("imports:  weir:transform/types@0.2.0, weir:transform/emitter@0.2.0"),
        "{report}"
    );
    assert!(
        report.contains("exports:  weir:transform/transformer@0.2.0"),
        "{report}"
    );
    assert!(report.contains("runnable: yes"), "{report}");

    let output = weir(&[
        "plugin",
        "inspect",
        plugin("sneaky-import").to_str().unwrap(),
    ]);
    let report = text_of(&output);
    assert!(!output.status.success());
    assert!(report.contains("imports:  acme:sneaky/clock"), "{report}");
    assert!(report.contains("runnable: no"), "{report}");
}

#[test]
fn a_plugin_that_keeps_state_between_calls_is_caught() {
    let (output, report) = test_with_own_fixtures("stateful");
    assert_eq!(output.status.code(), Some(2), "{report}");
    assert!(report.contains("NONDETERMINISTIC counts"), "{report}");
    assert!(
        report
            .contains("a second call in the same instance (the plugin keeps state between calls)"),
        "{report}"
    );
    // Its output is the same every time: the state tells the runs apart.
    assert!(report.contains("-       \"text\": \"1\""), "{report}");
    assert!(report.contains("+       \"text\": \"2\""), "{report}");
}

#[test]
fn stateful_fixtures_judge_the_state_after_each_input_of_a_sequence() {
    let (output, report) = test_with_own_fixtures("balances");
    assert!(output.status.success(), "{report}");
    assert!(report.contains("3 passed, 0 failed"), "{report}");

    let dir = tempfile::tempdir().unwrap();
    let fixtures = repo_root().join("plugins/balances/fixtures");
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let run = |component: &str| {
        weir(&[
            "plugin",
            "test",
            plugin(component).to_str().unwrap(),
            "--fixtures",
            dir.path().to_str().unwrap(),
        ])
    };
    // The last input of the sequence leaves the balance at 0; the fixture now says 1.
    let sequence = dir.path().join("day-of-an-account.json");
    let text = std::fs::read_to_string(&sequence).unwrap();
    let at = text.rfind("\"json\": 0").unwrap();
    let mut wrong = text.clone();
    wrong.replace_range(at..at + "\"json\": 0".len(), "\"json\": 1");
    std::fs::write(&sequence, wrong).unwrap();
    // The deposit's expectation leaves out the state: it says the state is unchanged.
    let deposit = dir.path().join("deposit.json");
    let mut case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&deposit).unwrap()).unwrap();
    case["expect"].as_object_mut().unwrap().remove("state");
    std::fs::write(&deposit, case.to_string()).unwrap();

    let output = run("balances");
    let report = text_of(&output);
    assert_eq!(output.status.code(), Some(2), "{report}");
    assert!(
        report.contains("FAIL             day-of-an-account"),
        "{report}"
    );
    assert!(
        report.contains("input 5 of 5: expected (-) vs actual (+):"),
        "{report}"
    );
    assert!(report.contains("-       \"json\": 1"), "{report}");
    assert!(report.contains("+       \"json\": 0"), "{report}");
    assert!(report.contains("FAIL             deposit"), "{report}");
    assert!(report.contains("+   \"state\": {"), "{report}");
    assert!(report.contains("1 passed, 2 failed"), "{report}");

    // A 0.1.0 plugin has no state to start from.
    let output = run("echo-v1");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "gives state (a state_key, state or expect.state), and the plugin speaks weir:transform/transformer@0.1.0, which has no state"
        ),
        "{stderr}"
    );
}

#[test]
fn a_python_plugin_passes_its_fixtures_on_deterministic_wasi() {
    // Its fixtures pin the clock (data time) and the random id (seeded by the case's name):
    // three runs per case, two of them in fresh instances, must agree with them.
    let (output, report) = test_with_own_fixtures("stamp-py");
    assert!(output.status.success(), "{report}");
    assert!(report.contains("4 passed, 0 failed"), "{report}");
}

#[test]
fn a_stateful_python_plugin_passes_its_fixtures() {
    // Contract 0.2.0 through componentize-py: a sequence of orders on one customer, each
    // seeing the tally the one before left, the rejected ones leaving it as it was.
    let (output, report) = test_with_own_fixtures("tally-py");
    assert!(output.status.success(), "{report}");
    assert!(report.contains("2 passed, 0 failed"), "{report}");
}

#[test]
fn the_harness_is_a_library_for_cargo_test() {
    let orders = repo_root().join("plugins/orders/fixtures");
    let report = weir_sandbox::harness::check(&plugin("orders"), &orders).expect("orders passes");
    assert_eq!((report.passed(), report.failed()), (4, 0));

    let stateful = repo_root().join("plugins/stateful/fixtures");
    let failure = weir_sandbox::harness::check(&plugin("stateful"), &stateful)
        .err()
        .expect("a stateful plugin fails");
    assert!(failure.contains("NONDETERMINISTIC counts"), "{failure}");
    assert!(failure.contains("0 passed, 1 failed"), "{failure}");
}

#[test]
fn compiled_plugins_are_cached_on_disk_and_a_bad_entry_is_compiled_again() {
    use std::os::unix::fs::PermissionsExt;
    use weir_core::plugin::{Outcome, TransformInput};
    use weir_sandbox::Sandbox;
    use weir_sandbox::{LimitsConfig, SandboxConfig};

    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("compiled");
    let settings = SandboxConfig {
        compile_cache_dir: Some(cache.clone()),
        ..SandboxConfig::default()
    };
    let limits = LimitsConfig::default();
    let load = || {
        // A new sandbox each time: a restarted weir.
        let sandbox = Sandbox::new(
            &settings,
            limits.memory_bytes,
            weir_sandbox::Compiler::InThisProcess,
        )
        .unwrap();
        let plugin = sandbox.load(&plugin("orders"), &limits).unwrap();
        let input = TransformInput {
            subject: "orders.in.new".into(),
            headers: vec![],
            payload: br#"{"id":"o-1","customer":"c-1","items":[]}"#.to_vec(),
            stream_sequence: 1,
            data_time_unix_ns: 0,
            dedup_key: "k".into(),
            seed: 0,
        };
        assert!(matches!(plugin.run(input), Outcome::Outputs(outputs) if outputs.len() == 2));
    };
    let entry = || {
        let entries: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        entries[0].clone()
    };

    load();
    let entry = entry();
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // An entry is written to a new file renamed into place: the same inode is the same entry.
    let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&entry).unwrap());
    let written = inode();
    load();
    assert_eq!(
        inode(),
        written,
        "a restart loads the entry, it does not compile again"
    );

    std::fs::write(&entry, b"not a compiled component").unwrap();
    load();
    assert!(
        std::fs::metadata(&entry).unwrap().len() > 1000,
        "a bad entry is compiled again and replaced"
    );

    // A cache others may write to is not trusted: weir compiles instead.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(&entry, b"planted by someone else").unwrap();
    load();
}
