//! Exactly-once state under `kill -9`: the balances plugin (contract 0.2.0) keeps a running
//! balance per account in the pipeline's state, and weir is killed at random moments while
//! it works and restarted each time. In the end every account's committed state equals a
//! model computed from the workload alone, and every output (the balance after each
//! transaction) is in the output stream exactly once with the model's value at that point;
//! every overdraft is dead-lettered exactly once and changed nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use weir_tests::*;

const TRANSACTIONS: usize = 20_000;
const ACCOUNTS: u64 = 200;
const KILLS: usize = 20;

/// The transactions, as (account, amount): mostly deposits and small withdrawals, some
/// large enough to overdraw.
fn workload(rng: &mut SeededRng) -> Vec<(String, i64)> {
    (0..TRANSACTIONS)
        .map(|_| {
            let account = format!("acct-{}", rng.below(ACCOUNTS));
            let amount = match rng.below(10) {
                0..=4 => rng.below(100) as i64 + 1,
                5..=8 => -(rng.below(60) as i64 + 1),
                _ => -(rng.below(400) as i64 + 100),
            };
            (account, amount)
        })
        .collect()
}

/// Per input sequence, the balance it outputs (`None`: an overdraft, dead-lettered); and
/// every account's final balance.
fn model(transactions: &[(String, i64)]) -> (Vec<Option<i64>>, BTreeMap<String, i64>) {
    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    let outputs = transactions
        .iter()
        .map(|(account, amount)| {
            let balance = balances.entry(account.clone()).or_default();
            if *balance + amount < 0 {
                return None;
            }
            *balance += amount;
            Some(*balance)
        })
        .collect();
    (outputs, balances)
}

/// The input sequence a message id (`balances:IN@<created>#<sequence>:<index>`) names.
fn input_sequence(msg_id: &str) -> u64 {
    let after = msg_id.rsplit_once('#').expect("a stream-sequence key").1;
    after
        .split_once(':')
        .expect("an output index")
        .0
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_are_exactly_once_in_state_and_outputs_across_repeated_sigkills() {
    let seed = seed_from_env("WEIR_STATE_SEED");
    println!("state test seed: {seed} (rerun with WEIR_STATE_SEED={seed})");
    let mut rng = SeededRng(seed);
    let transactions = workload(&mut rng);
    let (expected_outputs, expected_balances) = model(&transactions);

    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let plugin = plugin("balances");
    let store_dir = dir.path().join("store");
    let config = PipelineToml {
        extra: "[pipeline.batch]\nmax_messages = 64\n\n[pipeline.state]\nkey = \"subject-token:2\"\n",
        ..PipelineToml::plain("balances", &server.url(), &plugin, &store_dir)
    }
    .write(dir.path(), "weir.toml");
    let log = dir.path().join("weir.log");

    let weir = spawn_weir(&config, Some(&log), None);
    wait_for_stream(&js, "IN").await;
    // In chunks: the client holds only so many unawaited acks before it waits for them.
    for chunk in transactions.chunks(1000) {
        publish_transactions(&js, chunk).await;
    }

    let mut weir = sigkill_while_working(&js, "OUT", KILLS, &mut rng, weir, || {
        spawn_weir(&config, Some(&log), None)
    })
    .await;
    wait_until_drained(&js, "IN", "weir").await;

    // An operator reads the state while weir runs: every account's balance, as the model.
    let state_cli = |args: &[&str]| weir_state(&config, args);
    for (account, balance) in expected_balances.iter().take(5) {
        let shown = state_cli(&["get", "--key", account]);
        let line = format!("  \"balance\" = \"{balance}\"");
        assert!(
            shown.lines().any(|l| l == line) || (*balance == 0 && shown.contains("0 entries")),
            "{account}: {shown}"
        );
    }
    let listed = state_cli(&["list", "--limit", "5"]);
    assert!(
        listed.starts_with("5 state keys of pipeline \"balances\"") && listed.contains("--after"),
        "{listed}"
    );
    assert!(weir.try_wait().unwrap().is_none(), "weir ran throughout");

    let status = terminate(&mut weir);
    assert!(status.success(), "SIGTERM stops weir cleanly, got {status}");

    // Every balance exactly once, with the model's value after its transaction.
    let outputs = read_stream(&js, "OUT").await;
    assert_balances_once(&transactions, outputs, read_stream(&js, "DLQ").await);
    let overdrafts = expected_outputs.iter().filter(|o| o.is_none()).count();
    println!(
        "{TRANSACTIONS} transactions over {ACCOUNTS} accounts, {overdrafts} overdrafts, {KILLS} kills"
    );

    // The committed state is the model's, account by account.
    let store = weir_store::Store::open(
        &store_dir,
        weir_store::StoreSettings {
            retention: Duration::from_secs(3600),
            cache_bytes: 8 << 20,
        },
    )
    .expect("the store opens once weir has stopped");
    let accounts: Vec<&str> = expected_balances.keys().map(String::as_str).collect();
    let state = store.load_state(&accounts).unwrap();
    for (account, state) in accounts.iter().zip(state) {
        // An account whose every transaction overdrew it has no state.
        let balance: i64 = state.entries().get("balance").map_or(0, |stored| {
            String::from_utf8(stored.clone()).unwrap().parse().unwrap()
        });
        assert_eq!(balance, expected_balances[*account], "{account}'s state");
    }
}

/// A partitioned stateful pipeline keeps nothing on disk: each commit carries its keys'
/// state with the outputs and the progress marker, in one atomic batch on the output
/// stream. Three partitions (by account, which is also the state key) on a weir killed
/// again and again, each run starting with nothing: every balance is exactly once with the
/// model's value, every overdraft dead-lettered once, and each account's last state message
/// holds the model's final balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_balances_are_exactly_once_with_nothing_on_disk_across_sigkills() {
    const PARTITIONS: u32 = 3;
    const PART_KILLS: usize = 6;
    let seed = seed_from_env("WEIR_STATE_SEED");
    println!("state test seed: {seed} (rerun with WEIR_STATE_SEED={seed})");
    let mut rng = SeededRng(seed);
    let transactions: Vec<(String, i64)> = workload(&mut rng).into_iter().take(4000).collect();
    let (_, expected_balances) = model(&transactions);

    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let plugin = plugin("balances");
    let text = PipelineToml {
        subject: "in.*",
        partitions: Some(PARTITIONS),
        extra: "[pipeline.batch]\nmax_messages = 64\n\n[pipeline.state]\nkey = \"subject-token:2\"\n",
        ..PipelineToml::plain("balances", &server.url(), &plugin, Path::new("unused"))
    }
    .render()
    .replace(
        "partitions = 3",
        "partitions = 3\npartition_key = \"subject-token:2\"\nlease_ttl_secs = 1",
    );
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, ADMIN_OFF.to_owned() + &text).unwrap();
    let log = dir.path().join("weir.log");

    let weir = spawn_weir(&config, Some(&log), None);
    wait_for_stream(&js, "IN").await;
    // Spread over some 8 s, so that the kills strike while there is work.
    let publisher = {
        let (js, transactions) = (js.clone(), transactions.clone());
        tokio::spawn(async move {
            for chunk in transactions.chunks(100) {
                publish_transactions(&js, chunk).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut weir = sigkill_while_working(&js, "OUT", PART_KILLS, &mut rng, weir, || {
        spawn_weir(&config, Some(&log), None)
    })
    .await;
    publisher.await.unwrap();
    for partition in 0..PARTITIONS {
        let consumer = format!("weir-p{partition}");
        wait_for_showing_log(
            &format!("partition {partition} to drain"),
            Duration::from_secs(120),
            &log,
            || drained(&js, "IN", &consumer),
        )
        .await;
    }
    // The last run takes every partition over too, even with nothing left to do (its
    // markers name its process).
    let last_run = format!("/{}/", weir.id());
    wait_for_showing_log(
        "the last run to take every partition over",
        Duration::from_secs(60),
        &log,
        || async {
            let mut taken = 0;
            for partition in 0..PARTITIONS {
                let subject = format!("_weir.progress.balances.{partition}");
                let markers = progress_markers(&js, "OUT", &subject).await;
                taken += usize::from(markers.iter().any(|(owner, _)| owner.contains(&last_run)));
            }
            taken == PARTITIONS as usize
        },
    )
    .await;
    let status = terminate(&mut weir);
    assert!(status.success(), "SIGTERM stops weir cleanly, got {status}");
    assert!(!dir.path().join("unused").exists(), "nothing on disk");

    assert_commits_once(&js, &transactions).await;

    // An operator reads the same from the stream: `weir state` needs no store.
    let state_cli = |args: &[&str]| weir_state(&config, args);
    for (account, balance) in expected_balances.iter().filter(|(_, b)| **b > 0).take(3) {
        let shown = state_cli(&["get", "--key", account]);
        let line = format!("  \"balance\" = \"{balance}\"");
        assert!(shown.lines().any(|l| l == line), "{account}: {shown}");
    }
    let listed = state_cli(&["list", "--limit", "5"]);
    assert!(
        listed.starts_with("5 state keys of pipeline \"balances\"") && listed.contains("--after"),
        "{listed}"
    );
}

/// Three hosts share six partitions of the stateful pipeline on a 3-node cluster (R3
/// streams), while transactions arrive: one host is SIGKILLed and restarted, one SIGSTOPped
/// past its leases and woken, one stopped with SIGTERM and started again. Every balance is
/// exactly once with the model's value, and every account's last state message holds the
/// model's final balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_balances_on_a_cluster_stay_exact_as_hosts_die_stall_and_leave() {
    const TTL_SECS: u64 = 3;
    let seed = seed_from_env("WEIR_STATE_SEED");
    println!("state test seed: {seed} (rerun with WEIR_STATE_SEED={seed})");
    let mut rng = SeededRng(seed);
    let transactions: Vec<(String, i64)> = workload(&mut rng).into_iter().take(3000).collect();
    let (_, expected_balances) = model(&transactions);

    let cluster = NatsCluster::start().await;
    let js = async_nats::jetstream::new(connect_client(&cluster.url(0)).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "IN".into(),
        subjects: vec!["in.*".into()],
        num_replicas: 3,
        subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
            source: "in.*".into(),
            destination: "{{partition(6,1)}}.in.{{wildcard(1)}}".into(),
        }),
        ..Default::default()
    })
    .await
    .expect("the partitioned input stream");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec![
            "out.>".into(),
            "dlq".into(),
            "_weir.progress.balances.>".into(),
        ],
        num_replicas: 3,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await
    .expect("the output stream");
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin("balances");
    let text = PipelineToml {
        subject: "in.*",
        partitions: Some(6),
        extra: "[pipeline.batch]\nmax_messages = 64\n\n[pipeline.state]\nkey = \"subject-token:2\"\n",
        ..PipelineToml::plain("balances", &cluster.urls(), &plugin, Path::new("unused"))
    }
    .render()
    .replace(
        "partitions = 6",
        &format!("partitions = 6\npartition_key = \"subject-token:2\"\nlease_ttl_secs = {TTL_SECS}"),
    );
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, ADMIN_OFF.to_owned() + &text).unwrap();
    let log = |host: usize| dir.path().join(format!("h{host}.log"));
    let start = |host: usize| spawn_weir(&config, Some(&log(host)), None);
    let mut hosts: Vec<WeirProcess> = (0..3).map(start).collect();

    // Spread over some 9 s, so that every fault strikes while there is work.
    let publisher = {
        let (js, transactions) = (js.clone(), transactions.clone());
        tokio::spawn(async move {
            for chunk in transactions.chunks(100) {
                publish_transactions(&js, chunk).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let progress = || async { stream_len(&js, "OUT").await };
    let mut before = progress().await;
    for fault in 0..3 {
        wait_for_showing_log(
            "the pipeline to make progress",
            Duration::from_secs(60),
            &log(fault),
            || async { progress().await > before + 200 },
        )
        .await;
        match fault {
            0 => {
                println!("SIGKILL host 0, then restart it");
                hosts[0].kill().unwrap();
                hosts[0].wait().unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
                hosts[0] = start(0);
            }
            1 => {
                println!("SIGSTOP host 1 past its leases, then SIGCONT");
                send_signal(&hosts[1], libc::SIGSTOP);
                tokio::time::sleep(Duration::from_secs(TTL_SECS + 1)).await;
                send_signal(&hosts[1], libc::SIGCONT);
            }
            _ => {
                println!("SIGTERM host 2 (it leaves), then start it (it joins)");
                let status = terminate(&mut hosts[2]);
                assert!(status.success(), "host 2 stops cleanly, got {status}");
                hosts[2] = start(2);
            }
        }
        before = progress().await;
    }
    publisher.await.unwrap();
    for partition in 0..6 {
        let consumer = format!("weir-p{partition}");
        wait_for(
            &format!("partition {partition} to drain"),
            Duration::from_secs(120),
            || drained(&js, "IN", &consumer),
        )
        .await;
    }
    for (host, process) in hosts.iter_mut().enumerate() {
        let status = terminate(process);
        assert!(status.success(), "host {host} stops cleanly, got {status}");
    }

    assert_commits_once(&js, &transactions).await;
    println!(
        "verdict: {} transactions over {} accounts on six partitions, exactly once in outputs and state",
        transactions.len(),
        expected_balances.len()
    );
}

/// Reads a partitioned pipeline's output stream `OUT`: every balance and every dead letter
/// in it is there exactly once, as the model says, and each account's last state message
/// (its state now) holds the model's final balance.
async fn assert_commits_once(js: &async_nats::jetstream::Context, transactions: &[(String, i64)]) {
    const STATE: &str = "_weir.progress.balances.state.";
    let mut last_state: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let (mut outputs, mut letters) = (Vec::new(), Vec::new());
    for message in read_stream(js, "OUT").await {
        if let Some(hex) = message.subject.strip_prefix(STATE) {
            last_state.insert(from_hex(hex), message.payload);
        } else if message.subject == "dlq" {
            letters.push(message);
        } else if message.subject.starts_with("out.") {
            outputs.push(message);
        }
    }
    assert_balances_once(transactions, outputs, letters);
    for (account, balance) in &model(transactions).1 {
        // An account whose every transaction overdrew it has no state.
        let stored = last_state
            .get(account)
            .map_or(0, |state| stored_balance(state));
        assert_eq!(stored, *balance, "{account}'s state");
    }
}

/// The key a state subject's last token names, in hex.
fn from_hex(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).expect("hex"))
        .collect();
    String::from_utf8(bytes).expect("a UTF-8 key")
}

/// The `balance` entry of a key's state as weir commits it: entries in turn, each a name
/// and a value, each of them a 4-byte big-endian length and its bytes.
fn stored_balance(mut state: &[u8]) -> i64 {
    fn part(state: &mut &[u8]) -> Vec<u8> {
        let length = u32::from_be_bytes(state[..4].try_into().unwrap()) as usize;
        let part = state[4..4 + length].to_vec();
        *state = &state[4 + length..];
        part
    }
    let mut balance = None;
    while !state.is_empty() {
        let (name, value) = (part(&mut state), part(&mut state));
        if name == b"balance" {
            balance = Some(String::from_utf8(value).unwrap().parse().unwrap());
        }
    }
    balance.expect("a balance entry")
}

/// Every balance in `outputs` exactly once, with the model's value after its transaction;
/// every overdraft in `letters` exactly once; nothing else.
fn assert_balances_once(
    transactions: &[(String, i64)],
    outputs: Vec<StoredMessage>,
    letters: Vec<StoredMessage>,
) {
    let (expected_outputs, _) = model(transactions);
    let mut seen: HashMap<u64, i64> = HashMap::new();
    for message in outputs {
        let sequence = input_sequence(message.msg_id.as_deref().expect("an id"));
        let balance: i64 = String::from_utf8(message.payload).unwrap().parse().unwrap();
        let (account, _) = &transactions[sequence as usize - 1];
        assert_eq!(message.subject, format!("out.balance.{account}"));
        assert!(
            seen.insert(sequence, balance).is_none(),
            "the balance after input {sequence} is stored twice"
        );
    }
    let mut dead: Vec<u64> = letters
        .iter()
        .map(|letter| input_sequence(letter.msg_id.as_deref().expect("an id")))
        .collect();
    dead.sort_unstable();
    let before_dedup = dead.len();
    dead.dedup();
    assert_eq!(
        dead.len(),
        before_dedup,
        "each overdraft dead-lettered once"
    );
    for (index, expected) in expected_outputs.iter().enumerate() {
        let sequence = index as u64 + 1;
        match expected {
            Some(balance) => assert_eq!(
                seen.get(&sequence),
                Some(balance),
                "the balance after input {sequence}"
            ),
            None => assert!(
                dead.binary_search(&sequence).is_ok(),
                "overdraft {sequence} dead-lettered"
            ),
        }
    }
    assert_eq!(
        seen.len() + dead.len(),
        transactions.len(),
        "nothing else stored"
    );
}

/// What `weir state <args> --config <config>` prints; it must succeed.
fn weir_state(config: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new(weir_binary())
        .arg("state")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run weir state");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    stdout
}

/// Publishes `transactions`, each on its account's subject (`in.<account>`), and awaits
/// the stream's acks.
async fn publish_transactions(js: &async_nats::jetstream::Context, transactions: &[(String, i64)]) {
    let mut acks = Vec::with_capacity(transactions.len());
    for (account, amount) in transactions {
        let ack = js
            .publish(format!("in.{account}"), format!("{amount:+}").into())
            .await
            .expect("publish a transaction");
        acks.push(ack);
    }
    for ack in acks {
        ack.await
            .expect("the input stream stores every transaction");
    }
}
