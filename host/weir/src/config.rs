//! The TOML configuration: what each key means, its default, and all validation.
//!
//! Validation happens here and only here: the rest of the host receives a `Config` whose
//! values are known to be usable. Every key is documented in the README's configuration
//! reference; keep the two in step.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use weir_core::Mode;
pub use weir_core::input::DedupMode;
use weir_core::state::{StateKeyRule, StateLimits, StateSettings};
use weir_core::subject;
pub use weir_nats::{BatchConfig, InputConfig, NatsConfig, OutputConfig};
pub use weir_sandbox::{LimitsConfig, MAX_THREADS, MAX_WASM_STACK, SandboxConfig};

/// The least memory weir's compiler process can work in.
const MIN_COMPILE_MEMORY: usize = 32 << 20;

/// A whole configuration file: one or more pipelines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Engine-wide sandbox settings, shared by every pipeline's plugin.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// The admin port: metrics, health, readiness, status.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The pipelines to run, each with its own consumer, plugin and store.
    #[serde(rename = "pipeline")]
    pub pipelines: Vec<PipelineConfig>,
}
/// One pipeline: input stream → plugin → output subjects, exactly once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The pipeline's name; part of every output's `Nats-Msg-Id`, so renaming a pipeline
    /// changes the ids of its outputs.
    pub name: String,
    /// The plugin component (`.wasm`), relative to the configuration file's directory.
    pub plugin: PathBuf,
    /// The RocksDB directory that records processed inputs; relative to the configuration
    /// file's directory. One host at a time may use it. Required in exactly-once mode,
    /// unused in at-least-once mode.
    pub store_dir: Option<PathBuf>,
    /// `exactly-once` (default): every input's outputs are committed to the store before
    /// they are published, and a committed input never runs again. `at-least-once`: no
    /// store; outputs still carry deterministic `Nats-Msg-Id`s, so JetStream's duplicate
    /// window drops re-publishes inside it, but a redelivery after it runs the plugin and
    /// publishes again. Cheaper: no fsync per batch, no lookups.
    #[serde(default)]
    pub mode: Mode,
    /// How an input's identity is derived. By default `stream-sequence`.
    #[serde(default)]
    pub dedup: DedupMode,
    /// How long a processed input is remembered, in seconds; an input seen again after that
    /// is processed again. By default 604800 (7 days). Must exceed the longest redelivery
    /// horizon (ack_wait × max deliveries, plus downtime) and the input stream's max age.
    #[serde(default = "default_dedup_retention_secs")]
    pub dedup_retention_secs: u64,
    /// The dedup store's block cache, in MiB: with its memtables (4 × 16 MiB at most), what
    /// bounds the store's memory however many ids it holds. By default 64.
    #[serde(default = "default_store_cache_mb")]
    pub store_cache_mb: u64,
    pub nats: NatsConfig,
    pub input: InputConfig,
    pub output: OutputConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    /// A stateful pipeline's keyed state, for a plugin of contract 0.2.0.
    pub state: Option<StateConfig>,
    /// Runs the pipeline partitioned: each commit is an atomic batch on the output stream,
    /// its inputs' outputs and dead letters with a progress marker that says which inputs
    /// are done (on `_weir.progress.<name>.<partition>`), fenced so that a host that has
    /// lost a partition cannot publish. Nothing the pipeline relies on stays on its host:
    /// no `store_dir`, and a host with an empty disk resumes exactly where the last one
    /// stopped. The output stream must also store the dead letters and the markers, and
    /// allow atomic publish. At most 64.
    pub partitions: Option<u32>,
    /// Which part of an input names its partition, when there are several: `"subject-
    /// token:N"`, the Nth token of its subject (from 1), which `input.subject` must match
    /// with a `*`. The input stream stores each input under its partition
    /// (`<partition>.<subject>`, by nats-server's deterministic `partition` mapping), and
    /// inputs of one key keep their order.
    pub partition_key: Option<String>,
    /// A partitioned pipeline's lease on its partition: held by one host at a time, renewed
    /// every third of this many seconds; a standby takes the partition over when its holder
    /// stops (at once) or dies (within this). By default 10.
    #[serde(default = "default_lease_ttl_secs")]
    pub lease_ttl_secs: u64,
}

const PARTITION_KEY_ALONE: &str = "partition_key is used only with partitions above 1";

fn default_lease_ttl_secs() -> u64 {
    10
}

fn default_store_cache_mb() -> u64 {
    64
}

/// The `[pipeline.state]` table: the keyed state a plugin of contract 0.2.0 reads and
/// writes, committed with its outputs. Needs mode = "exactly-once".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Which part of an input names its state key: `"subject-token:N"` (the subject's Nth
    /// token, from 1) or `"header:Name"` (the first value of header `Name`). Inputs of one
    /// key run in stream order, each on the state the one before left.
    pub key: String,
    /// The largest entry, name and value together, in bytes. By default 65536.
    #[serde(default = "default_max_entry_bytes")]
    pub max_entry_bytes: usize,
    /// The most a key's entries may hold together, names and values, in bytes. By default
    /// 1048576.
    #[serde(default = "default_max_key_bytes")]
    pub max_key_bytes: usize,
}

fn default_max_entry_bytes() -> usize {
    StateLimits::default().max_entry_bytes
}

fn default_max_key_bytes() -> usize {
    StateLimits::default().max_key_bytes
}

impl StateConfig {
    /// The state as the core keeps it; `Err` says what is wrong with `key`.
    pub fn settings(&self) -> Result<StateSettings, String> {
        Ok(StateSettings {
            key: StateKeyRule::parse(&self.key)?,
            limits: StateLimits {
                max_entry_bytes: self.max_entry_bytes,
                max_key_bytes: self.max_key_bytes,
            },
        })
    }
}

fn default_dedup_retention_secs() -> u64 {
    7 * 24 * 3600
}

/// The `[admin]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port` the admin port listens on; `""` turns it off.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> AdminConfig {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

fn default_admin_listen() -> String {
    weir_admin::DEFAULT_LISTEN.to_owned()
}

impl AdminConfig {
    /// The address to listen on, `None` when the admin port is off.
    pub fn address(&self) -> Option<&str> {
        Some(self.listen.trim()).filter(|listen| !listen.is_empty())
    }
}

/// A configuration every value of which is usable: only [`Config::validate`] (and
/// [`Config::load`]) make one, so that nothing can run an unchecked one.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The file it was read from: what a reload reads again.
    source: PathBuf,
    sandbox: SandboxConfig,
    admin: AdminConfig,
    pipelines: Vec<ValidPipeline>,
}

impl ValidConfig {
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn admin(&self) -> &AdminConfig {
        &self.admin
    }

    pub fn sandbox(&self) -> &SandboxConfig {
        &self.sandbox
    }

    pub fn pipelines(&self) -> &[ValidPipeline] {
        &self.pipelines
    }

    pub fn into_pipelines(self) -> Vec<ValidPipeline> {
        self.pipelines
    }

    /// The largest `limits.memory_bytes` of any pipeline: what the engine's instance pool
    /// must be able to hold.
    pub fn largest_memory_limit(&self) -> usize {
        largest_memory_limit(self.pipelines.iter().map(ValidPipeline::config))
    }
}

/// One pipeline of a [`ValidConfig`].
#[derive(Debug, Clone)]
pub struct ValidPipeline {
    config: PipelineConfig,
    delivery: Delivery,
}

impl ValidPipeline {
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Its input across all its partitions: a partitioned stream stores each input as
    /// `<partition>.<subject>`, and the plugin sees the subject as published.
    pub fn whole_input(&self) -> InputConfig {
        let mut input = self.config.input.clone();
        if self.config.input_partitioning().is_some() {
            input.subject = format!("*.{}", input.subject);
            input.strip_partition = true;
        }
        input
    }

    /// This pipeline as replay run `run` runs it: with `plugin`, outputs under `prefix`
    /// (stored by `output_stream` if weir is to create one), exactly once with a store of
    /// its own, its own durable consumer (`weir-replay-<run>`, starting at stream sequence
    /// `first`, with `description`), and its own output ids: the run's name
    /// (`<pipeline>.replay.<run>`) is in every one. A partitioned pipeline's replay reads
    /// every partition at once. Nothing of the live pipeline's is shared.
    pub fn for_replay(&self, replay: ReplayWiring) -> ValidPipeline {
        let mut config = self.config.clone();
        config.name = format!("{}.replay.{}", config.name, replay.run);
        config.plugin = replay.plugin;
        if config.output.prefix != replay.prefix {
            config.output.prefix = replay.prefix;
            config.output.stream = replay.output_stream;
        }
        config.mode = Mode::ExactlyOnce;
        config.store_dir = Some(replay.store_dir.clone());
        config.input = self.whole_input();
        config.partitions = None;
        config.partition_key = None;
        config.input.consumer = format!("weir-replay-{}", replay.run);
        config.input.create_stream = false;
        config.input.start_sequence = Some(replay.first);
        config.input.description = Some(replay.description);
        ValidPipeline {
            config,
            delivery: Delivery::ExactlyOnce {
                store_dir: replay.store_dir,
            },
        }
    }
}

/// What makes a pipeline a replay run ([`ValidPipeline::for_replay`]).
pub struct ReplayWiring {
    pub run: String,
    pub plugin: PathBuf,
    pub prefix: String,
    pub output_stream: Option<String>,
    pub store_dir: PathBuf,
    pub first: u64,
    pub description: String,
}

/// A pipeline's guarantee, with what it needs: an exactly-once pipeline always has a store,
/// or is partitioned (and commits to its output stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    ExactlyOnce {
        store_dir: PathBuf,
    },
    AtLeastOnce,
    /// Exactly once, fenced commits on the output stream, no store.
    Partitioned,
}

fn largest_memory_limit<'a>(pipelines: impl IntoIterator<Item = &'a PipelineConfig>) -> usize {
    pipelines
        .into_iter()
        .map(|p| p.limits.memory_bytes)
        .max()
        .unwrap_or(0)
}

/// A configuration that cannot be used, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path:?}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path:?}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads, parses and validates a configuration file. Relative paths in it are resolved
    /// against the file's directory. Every problem is reported, in one line.
    pub fn load(path: &Path) -> Result<ValidConfig, ConfigError> {
        let (config, _) = Config::load_with_problems(path)?;
        config.validate(path)
    }

    /// The configuration as one that can run, or every problem with it in one line.
    /// `source` names where it came from, for the error.
    pub fn validate(self, source: &Path) -> Result<ValidConfig, ConfigError> {
        let invalid = |problems: Vec<String>| ConfigError::Invalid {
            path: source.to_owned(),
            message: problems.join("; "),
        };
        let problems = self.problems();
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let pipelines = self
            .pipelines
            .into_iter()
            .map(|config| {
                let delivery = match (config.mode, &config.store_dir, config.partitions) {
                    (Mode::ExactlyOnce, Some(store_dir), None) => Delivery::ExactlyOnce {
                        store_dir: store_dir.clone(),
                    },
                    (Mode::AtLeastOnce, None, None) => Delivery::AtLeastOnce,
                    (Mode::ExactlyOnce, None, Some(_)) => Delivery::Partitioned,
                    // `problems` names each of these; refused here again all the same.
                    _ => {
                        return Err(invalid(vec![format!(
                            "pipeline {:?}: mode, store_dir and partitions disagree",
                            config.name
                        )]));
                    }
                };
                Ok(ValidPipeline { config, delivery })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ValidConfig {
            source: source.to_owned(),
            sandbox: self.sandbox,
            admin: self.admin,
            pipelines,
        })
    }

    /// Reads and parses a configuration file, and lists what is wrong with its values
    /// without refusing it (for `weir check`, which goes on to check what it can).
    pub fn load_with_problems(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let config = Config::parse(&text, base_dir).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        let problems = config.problems();
        Ok((config, problems))
    }

    /// Parses the TOML (unknown keys are errors) and resolves relative paths.
    fn parse(text: &str, base_dir: &Path) -> Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        if let Some(dir) = &mut config.sandbox.compile_cache_dir {
            *dir = base_dir.join(&*dir);
        }
        for pipeline in &mut config.pipelines {
            pipeline.plugin = base_dir.join(&pipeline.plugin);
            if let Some(store_dir) = &mut pipeline.store_dir {
                *store_dir = base_dir.join(&*store_dir);
            }
            for file in [
                &mut pipeline.nats.credentials_file,
                &mut pipeline.nats.tls_ca_file,
                &mut pipeline.nats.tls_cert_file,
                &mut pipeline.nats.tls_key_file,
            ]
            .into_iter()
            .flatten()
            {
                *file = base_dir.join(&*file);
            }
        }
        Ok(config)
    }

    /// The largest `limits.memory_bytes` of any pipeline: what the engine's instance pool
    /// must be able to hold.
    pub fn largest_memory_limit(&self) -> usize {
        largest_memory_limit(&self.pipelines)
    }

    /// Every problem with the configuration, each naming the key and what to do.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.pipelines.is_empty() {
            problems.push("no pipelines: add a [[pipeline]] table".into());
        }
        // wasm runs on the host thread's stack: past the blocking pool's 2 MiB threads, a deep
        // recursion would overflow the host instead of trapping.
        if !(64 * 1024..=MAX_WASM_STACK).contains(&self.sandbox.max_stack_bytes) {
            problems.push(format!(
                "sandbox.max_stack_bytes must be between 65536 and {MAX_WASM_STACK}"
            ));
        }
        if !(1..=MAX_THREADS).contains(&self.sandbox.threads) {
            problems.push(format!(
                "sandbox.threads must be between 1 and {MAX_THREADS} (leave it out for one per core)"
            ));
        }
        // Below these, weir's own compiler process cannot start or finish an empty component.
        if self.sandbox.compile_memory_bytes < MIN_COMPILE_MEMORY {
            problems.push(format!(
                "sandbox.compile_memory_bytes must be at least {MIN_COMPILE_MEMORY} (leave it out for 2 GiB)"
            ));
        }
        if self.sandbox.compile_timeout_ms < 100 {
            problems.push(
                "sandbox.compile_timeout_ms must be at least 100 (leave it out for 120 000)".into(),
            );
        }
        if let Some(listen) = self.admin.address()
            && listen.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(format!(
                "admin.listen {listen:?} is not an address and port (e.g. \"{}\"; \"\" turns the admin port off)",
                weir_admin::DEFAULT_LISTEN
            ));
        }
        let mut names = HashSet::new();
        let mut store_dirs = HashSet::new();
        for pipeline in &self.pipelines {
            problems.extend(
                pipeline
                    .problems()
                    .into_iter()
                    .map(|problem| format!("pipeline {:?}: {problem}", pipeline.name)),
            );
            if !names.insert(&pipeline.name) {
                problems.push(format!(
                    "two pipelines are named {:?}: names must be unique",
                    pipeline.name
                ));
            }
            if let Some(store_dir) = &pipeline.store_dir
                && !store_dirs.insert(store_dir)
            {
                problems.push(format!(
                    "pipelines share the store_dir {store_dir:?}: give each pipeline its own"
                ));
            }
        }
        problems
    }
}

impl PipelineConfig {
    /// What the dedup store of this pipeline is opened with.
    pub fn store_settings(&self) -> weir_store::StoreSettings {
        weir_store::StoreSettings {
            retention: std::time::Duration::from_secs(self.dedup_retention_secs),
            cache_bytes: usize::try_from(self.store_cache_mb)
                .unwrap_or(usize::MAX)
                .saturating_mul(1 << 20),
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let is_name = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !is_name(&self.name) {
            problems.push("name must be letters, digits, '-' or '_'".into());
        }
        for (key, stream) in [
            ("input.stream", Some(&self.input.stream)),
            ("output.stream", self.output.stream.as_ref()),
            ("output.dlq_stream", self.output.dlq_stream.as_ref()),
        ] {
            if let Some(stream) = stream
                && !is_name(stream)
            {
                problems.push(format!(
                    "{key} {stream:?} is not a stream name: use letters, digits, '-' or '_'"
                ));
            }
        }
        if !is_name(&self.input.consumer) {
            problems.push(format!(
                "input.consumer {:?} is not a consumer name: use letters, digits, '-' or '_'",
                self.input.consumer
            ));
        }
        if !subject::is_filter(&self.input.subject) {
            problems.push(format!(
                "input.subject {:?} is not a subject filter (e.g. \"orders.>\")",
                self.input.subject
            ));
        }
        for (key, value) in [
            ("output.prefix", &self.output.prefix),
            ("output.dlq_subject", &self.output.dlq_subject),
        ] {
            if !subject::is_literal(value) {
                problems.push(format!(
                    "{key} {value:?} must be a subject without wildcards (e.g. \"orders.out\")"
                ));
            }
        }
        // Any subject the pipeline publishes on must not flow back into its own input.
        let outputs = format!("{}.>", self.output.prefix);
        for published in [&outputs, &self.output.dlq_subject] {
            if subject::overlaps(&self.input.subject, published) {
                problems.push(format!(
                    "input.subject {:?} overlaps {published:?}, which this pipeline publishes \
                     on: its outputs would come back as inputs; choose disjoint subjects",
                    self.input.subject
                ));
            }
        }
        if subject::matches(
            &format!("{}.>", self.output.prefix),
            &self.output.dlq_subject,
        ) || self.output.prefix == self.output.dlq_subject
        {
            problems.push(format!(
                "output.dlq_subject {:?} is under output.prefix {:?}: a plugin could forge dead \
                 letters; choose a subject outside the prefix",
                self.output.dlq_subject, self.output.prefix
            ));
        }
        let nats = &self.nats;
        if nats.tls_cert_file.is_some() != nats.tls_key_file.is_some() {
            problems.push("nats.tls_cert_file and nats.tls_key_file go together: set both".into());
        }
        if nats.user.is_some() != nats.password.is_some() {
            problems.push("nats.user and nats.password go together: set both".into());
        }
        let limits = &self.limits;
        for (key, value) in [
            ("limits.fuel", limits.fuel),
            ("limits.deadline_ms", limits.deadline_ms),
            ("limits.max_outputs", limits.max_outputs as u64),
            ("limits.max_output_bytes", limits.max_output_bytes as u64),
            ("batch.max_messages", self.batch.max_messages as u64),
            ("input.ack_wait_ms", self.input.ack_wait_ms),
            ("nats.connect_timeout_ms", nats.connect_timeout_ms),
            ("nats.ping_interval_ms", nats.ping_interval_ms),
            ("store_cache_mb", self.store_cache_mb),
            ("lease_ttl_secs", self.lease_ttl_secs),
        ] {
            if value == 0 {
                problems.push(format!("{key} must be greater than 0"));
            }
        }
        if self.dedup_retention_secs.saturating_mul(1000) < 2 * self.input.ack_wait_ms {
            problems.push(format!(
                "dedup_retention_secs {} is shorter than two ack waits: a redelivered input could \
                 be processed twice; keep it above the longest redelivery horizon",
                self.dedup_retention_secs
            ));
        }
        match (self.mode, &self.store_dir) {
            (Mode::ExactlyOnce, None) if self.partitions.is_none() => problems.push(
                "store_dir is required in exactly-once mode: set it, or mode = \"at-least-once\""
                    .into(),
            ),
            (Mode::AtLeastOnce, Some(_)) => problems.push(
                "store_dir is not used in at-least-once mode: remove it, or mode = \"exactly-once\""
                    .into(),
            ),
            _ => {}
        }
        if self.partitions.is_some() {
            problems.extend(self.partitioning_problems());
        } else if self.partition_key.is_some() {
            problems.push(PARTITION_KEY_ALONE.into());
        }
        if self.input.ack_wait_ms < 100 {
            problems.push("input.ack_wait_ms must be at least 100".into());
        }
        if limits.memory_bytes < 64 * 1024 {
            problems.push("limits.memory_bytes must be at least 65536 (one wasm page)".into());
        }
        if limits.memory_bytes > 4 << 30 {
            problems.push("limits.memory_bytes must be at most 4 GiB (wasm32's limit)".into());
        }
        if let Some(state) = &self.state {
            if let Err(reason) = state.settings() {
                problems.push(format!("state.key {reason}"));
            }
            if self.mode == Mode::AtLeastOnce {
                problems.push(
                    "[pipeline.state] needs mode = \"exactly-once\": state is committed with the dedup store"
                        .into(),
                );
            }
            if state.max_entry_bytes == 0 || state.max_key_bytes < state.max_entry_bytes {
                problems.push(
                    "state.max_entry_bytes must be greater than 0 and at most state.max_key_bytes"
                        .into(),
                );
            }
        }
        problems
    }
}

impl PipelineConfig {
    /// The subject of a partition's progress markers.
    /// What a stateful partitioned pipeline's state subjects start with (a key's state is
    /// the last message on `<this>.<key in hex>`): among the marker subjects, so that the
    /// output stream stores them.
    pub fn state_subjects(&self) -> String {
        format!("{}.state", self.marker_subjects_prefix())
    }

    pub fn marker_subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.marker_subjects_prefix())
    }

    /// What every marker subject of this pipeline starts with.
    fn marker_subjects_prefix(&self) -> String {
        format!("_weir.progress.{}", self.name)
    }

    /// The partitions that run, each with its index (one, 0, for a pipeline that is not
    /// partitioned).
    pub fn partition_indexes(&self) -> std::ops::Range<u32> {
        0..self.partitions.unwrap_or(1).max(1)
    }

    /// The input stream's transform that puts each input's partition in front of its
    /// subject; `None` for a pipeline of one partition (or none).
    pub fn input_partitioning(&self) -> Option<weir_nats::InputPartitioning> {
        let partitions = self.partitions.filter(|&n| n > 1)?;
        let token = self.partition_token().ok()??;
        let tokens: Vec<&str> = self.input.subject.split('.').collect();
        // The partition hashes the key's wildcard, counted among the subject's wildcards.
        let wildcard = tokens[..token].iter().filter(|t| **t == "*").count();
        let mut wildcards = 0;
        let destination: Vec<String> = tokens
            .iter()
            .map(|t| match *t {
                "*" => {
                    wildcards += 1;
                    format!("{{{{wildcard({wildcards})}}}}")
                }
                other => other.to_owned(),
            })
            .collect();
        Some(weir_nats::InputPartitioning {
            source: self.input.subject.clone(),
            destination: format!(
                "{{{{partition({partitions},{wildcard})}}}}.{}",
                destination.join(".")
            ),
        })
    }

    /// The input of partition `partition`: its own consumer, filtered on the partition's
    /// stored subjects.
    pub fn partition_input(&self, partition: u32) -> weir_nats::InputConfig {
        match self.input_partitioning() {
            None => self.input.clone(),
            Some(_) => weir_nats::InputConfig {
                consumer: format!("{}-p{partition}", self.input.consumer),
                subject: format!("{partition}.>"),
                strip_partition: true,
                ..self.input.clone()
            },
        }
    }

    /// The token (from 1) `partition_key` names, if it is given; `Err` says what is wrong.
    fn partition_token(&self) -> Result<Option<usize>, String> {
        let Some(key) = &self.partition_key else {
            return Ok(None);
        };
        let token = key
            .strip_prefix("subject-token:")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                format!("partition_key {key:?} must be \"subject-token:N\", N from 1")
            })?;
        let tokens: Vec<&str> = self.input.subject.split('.').collect();
        if tokens.get(token - 1) != Some(&"*") {
            return Err(format!(
                "partition_key {key:?} names token {token} of input.subject {:?}, which must be a `*` there (e.g. \"orders.in.*\" for subject-token:3)",
                self.input.subject
            ));
        }
        Ok(Some(token))
    }

    /// The key of a partition's lease.
    pub fn lease_key(&self, partition: u32) -> String {
        format!("{}.{partition}", self.name)
    }

    /// The subjects of every partition's markers, as a stream's subject filter.
    pub fn marker_subjects(&self) -> String {
        format!("{}.>", self.marker_subjects_prefix())
    }

    /// What a partitioned pipeline needs beyond the rest.
    fn partitioning_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.partitions {
            Some(0) => problems.push("partitions must be at least 1".into()),
            Some(65..) => problems.push("partitions must be at most 64".into()),
            Some(2..) if self.partition_key.is_none() => problems.push(
                "partitions above 1 need partition_key (e.g. \"subject-token:3\"): which \
                 part of an input names its partition"
                    .into(),
            ),
            _ => {}
        }
        if let Err(problem) = self.partition_token() {
            problems.push(problem);
        }
        if self.partition_key.is_some() && self.partitions == Some(1) {
            problems.push(PARTITION_KEY_ALONE.into());
        }
        if self.mode == Mode::AtLeastOnce {
            problems.push("partitions needs mode = \"exactly-once\"".into());
        }
        if self.store_dir.is_some() {
            problems.push(
                "store_dir is not used by a partitioned pipeline (its commits, and what is done, \
                 are on the output stream): remove it"
                    .into(),
            );
        }
        if self.dedup == DedupMode::MsgId {
            problems.push(
                "dedup = \"msg-id\" is not supported with partitions: a partitioned pipeline \
                 knows its inputs by stream sequence (the input stream's duplicate window catches \
                 producer retries); remove dedup"
                    .into(),
            );
        }
        if let (Some(state), Some(partition_key), Some(2..)) =
            (&self.state, &self.partition_key, self.partitions)
            && state.key != *partition_key
        {
            problems.push(format!(
                "[pipeline.state] key {:?} is not partition_key {partition_key:?}: with several \
                 partitions a key's inputs must all be in one partition, which alone changes \
                 its state; make them the same",
                state.key
            ));
        }
        if let (Some(dlq_stream), Some(stream)) = (&self.output.dlq_stream, &self.output.stream)
            && dlq_stream != stream
        {
            problems.push(format!(
                "output.dlq_stream {dlq_stream:?} is not output.stream {stream:?}: a partitioned \
                 pipeline commits its dead letters with its outputs, in one atomic batch on one \
                 stream; remove output.dlq_stream"
            ));
        }
        if subject::overlaps(&self.input.subject, &self.marker_subjects()) {
            problems.push(format!(
                "input.subject {:?} overlaps {:?}, the pipeline's progress markers: choose an \
                 input subject that does not",
                self.input.subject,
                self.marker_subjects()
            ));
        }
        problems
    }
}

/// toml's errors span several lines (a source excerpt); keep the first line and the
/// explanation so the error stays one line.
/// A TOML error in one line that names the key it is about (`pipeline.limits.fuel`, or the
/// table for a missing key) and, for a number out of range, what is accepted.
fn parse_error(text: &str, error: &toml::de::Error) -> String {
    let mut message = one_line(error.message());
    if [
        "expected u64",
        "expected usize",
        "expected u32",
        "expected u16",
    ]
    .iter()
    .any(|expected| message.contains(expected))
    {
        message.push_str(" (a whole number, 0 or more)");
    }
    let Some(span) = error.span() else {
        return message;
    };
    let line_index = text[..span.start.min(text.len())].matches('\n').count();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let Some(line) = lines.get(line_index) else {
        return message;
    };
    // The table the line is in: the nearest header at or above it.
    let table = lines[..=line_index]
        .iter()
        .rev()
        .find(|line| line.starts_with('['))
        .map(|header| header.trim_matches(|c| c == '[' || c == ']').trim());
    let key = match line.starts_with('[') {
        true => None,
        false => line
            .split_once('=')
            .map(|(key, _)| key.trim().trim_matches('"')),
    };
    let name = match (table, key) {
        (Some(table), Some(key)) => format!("{table}.{key}"),
        (Some(name), None) | (None, Some(name)) => name.to_owned(),
        (None, None) => return format!("line {}: {message}", line_index + 1),
    };
    format!("{name} (line {}): {message}", line_index + 1)
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('|') && !line.ends_with('|'))
        .filter(|line| !line.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[pipeline]]
        name = "orders"
        plugin = "orders.wasm"
        store_dir = "store"
        [pipeline.nats]
        url = "nats://127.0.0.1:4222"
        [pipeline.input]
        stream = "ORDERS"
        subject = "orders.in.>"
        consumer = "weir"
        [pipeline.output]
        prefix = "orders.out"
        dlq_subject = "orders.dlq"
    "#;

    fn parse(text: &str) -> Result<Config, String> {
        let config = Config::parse(text, Path::new("/etc/weir"))?;
        match config.problems() {
            problems if problems.is_empty() => Ok(config),
            problems => Err(problems.join("; ")),
        }
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let config = parse(MINIMAL).unwrap();
        let pipeline = &config.pipelines[0];
        assert_eq!(pipeline.plugin, Path::new("/etc/weir/orders.wasm"));
        assert_eq!(
            pipeline.store_dir.as_deref(),
            Some(Path::new("/etc/weir/store"))
        );
        assert_eq!(pipeline.mode, Mode::ExactlyOnce);
        assert_eq!(pipeline.dedup, DedupMode::StreamSequence);
        assert_eq!(pipeline.dedup_retention_secs, 604_800);
        assert_eq!(pipeline.limits.fuel, 100_000_000);
        assert_eq!(pipeline.batch.max_messages, 256);
        assert!(pipeline.input.create_stream);
    }

    #[test]
    fn unknown_key_is_named_on_one_line() {
        let text = MINIMAL.replace("consumer = \"weir\"", "consumer = \"weir\"\nconsumr = 1");
        let error = parse(&text).unwrap_err();
        assert!(error.contains("unknown field `consumr`"), "{error}");
        assert!(!error.contains('\n'), "{error}");
    }

    /// A bad value names its key with its table and what is accepted; a missing key names
    /// its table (they once gave only a line and column, or "missing field `consumer`").
    #[test]
    fn type_errors_name_the_key_and_what_is_accepted() {
        let text = format!("{MINIMAL}\n[pipeline.limits]\nfuel = -1\n");
        let error = parse(&text).unwrap_err();
        assert!(
            error.starts_with("pipeline.limits.fuel (line ")
                && error.contains("expected u64 (a whole number, 0 or more)"),
            "{error}"
        );
        let text = MINIMAL.replace("consumer = \"weir\"", "");
        let error = parse(&text).unwrap_err();
        assert!(
            error.starts_with("pipeline.input (line ")
                && error.contains("missing field `consumer`"),
            "{error}"
        );
    }

    #[test]
    fn output_prefix_matched_by_input_filter_is_refused() {
        let text = MINIMAL.replace("orders.in.>", "orders.>");
        let error = parse(&text).unwrap_err();
        assert!(error.contains("would come back as inputs"), "{error}");
        // A prefix above the input: output `in.x` would land in `orders.in.x`.
        let text = MINIMAL.replace("\"orders.out\"", "\"orders\"");
        let error = parse(&text).unwrap_err();
        assert!(error.contains("would come back as inputs"), "{error}");
    }

    #[test]
    fn a_state_table_names_its_key_and_needs_exactly_once() {
        let text = format!("{MINIMAL}\n[pipeline.state]\nkey = \"header:Account\"\n");
        let state = parse(&text).unwrap().pipelines[0].state.clone().unwrap();
        let settings = state.settings().unwrap();
        assert_eq!(settings.key, StateKeyRule::Header("Account".into()));
        assert_eq!(settings.limits, StateLimits::default());
        let text = format!("{MINIMAL}\n[pipeline.state]\nkey = \"account\"\n");
        let error = parse(&text).unwrap_err();
        assert!(
            error.contains("state.key") && error.contains("subject-token:N"),
            "{error}"
        );
        let text = format!(
            "{}\n[pipeline.state]\nkey = \"subject-token:2\"\n",
            MINIMAL.replace("store_dir = \"store\"", "mode = \"at-least-once\"")
        );
        let error = parse(&text).unwrap_err();
        assert!(error.contains("needs mode = \"exactly-once\""), "{error}");
        let text = format!(
            "{MINIMAL}\n[pipeline.state]\nkey = \"subject-token:2\"\nmax_entry_bytes = 10\nmax_key_bytes = 5\n"
        );
        let error = parse(&text).unwrap_err();
        assert!(error.contains("at most state.max_key_bytes"), "{error}");
    }

    #[test]
    fn dlq_under_output_prefix_is_refused() {
        let text = MINIMAL.replace("\"orders.dlq\"", "\"orders.out.dlq\"");
        assert!(
            parse(&text)
                .unwrap_err()
                .contains("could forge dead letters")
        );
    }

    #[test]
    fn wildcard_prefix_and_zero_limits_are_refused() {
        let text = MINIMAL.replace("\"orders.out\"", "\"orders.*\"");
        assert!(parse(&text).unwrap_err().contains("without wildcards"));
        let text = format!("{MINIMAL}\n[pipeline.limits]\nfuel = 0\n");
        assert!(
            parse(&text)
                .unwrap_err()
                .contains("limits.fuel must be greater than 0")
        );
    }

    #[test]
    fn sandbox_threads_default_to_the_cores_and_zero_is_refused() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            parse(MINIMAL).unwrap().sandbox.threads,
            cores.min(MAX_THREADS)
        );
        let text = format!("[sandbox]\nthreads = 0\n{MINIMAL}");
        let error = parse(&text).unwrap_err();
        assert!(
            error.contains("sandbox.threads must be between 1"),
            "{error}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = MINIMAL
            .replace("\"orders.out\"", "\"orders.*\"")
            .replace("consumer = \"weir\"", "consumer = \"we ir\"");
        let error = parse(&text).unwrap_err();
        assert!(error.contains("without wildcards"), "{error}");
        assert!(error.contains("is not a consumer name"), "{error}");
    }

    /// `weir::run` takes only a `ValidConfig`, which a `Config` becomes only through these
    /// checks: an exactly-once pipeline without a store never runs (it once ran with no
    /// store at all when given a `Config` built in code).
    #[test]
    fn an_exactly_once_pipeline_without_a_store_does_not_validate() {
        let text = MINIMAL.replace("store_dir = \"store\"", "");
        let config = Config::parse(&text, Path::new("/etc/weir")).unwrap();
        match config.validate(Path::new("weir.toml")) {
            Err(error) => assert!(
                error.to_string().contains("store_dir is required"),
                "{error}"
            ),
            Ok(_) => panic!("an exactly-once pipeline without a store validated"),
        }
        let valid = parse(MINIMAL)
            .unwrap()
            .validate(Path::new("weir.toml"))
            .unwrap();
        assert_eq!(
            valid.pipelines()[0].delivery(),
            &Delivery::ExactlyOnce {
                store_dir: "/etc/weir/store".into()
            }
        );
    }

    #[test]
    fn duplicate_store_dirs_are_refused() {
        let second = MINIMAL.replace("name = \"orders\"", "name = \"other\"");
        let error = parse(&format!("{MINIMAL}\n{second}")).unwrap_err();
        assert!(error.contains("share the store_dir"), "{error}");
    }

    #[test]
    fn a_partitioned_pipeline_has_no_store_and_refuses_what_it_cannot_keep() {
        let partitioned = MINIMAL.replace("store_dir = \"store\"", "partitions = 1");
        let valid = parse(&partitioned)
            .unwrap()
            .validate(Path::new("weir.toml"))
            .unwrap();
        assert_eq!(valid.pipelines()[0].delivery(), &Delivery::Partitioned);
        assert_eq!(
            valid.pipelines()[0].config().marker_subject(0),
            "_weir.progress.orders.0"
        );
        for (change, refusal) in [
            ("partitions = 0", "at least 1"),
            ("partitions = 6", "need partition_key"),
            (
                "partitions = 1\nstore_dir = \"store\"",
                "store_dir is not used",
            ),
            (
                "partitions = 1\nmode = \"at-least-once\"",
                "needs mode = \"exactly-once\"",
            ),
            ("partitions = 1\ndedup = \"msg-id\"", "msg-id"),
        ] {
            let text = MINIMAL.replace("store_dir = \"store\"", change);
            let error = parse(&text).unwrap_err();
            assert!(error.contains(refusal), "{change}: {error}");
        }
        // State with one partition: any key; with several, the partition key.
        let state = format!("{partitioned}\n[pipeline.state]\nkey = \"header:Account\"\n");
        assert!(parse(&state).is_ok());
        let several = MINIMAL
            .replace(
                "store_dir = \"store\"",
                "partitions = 6\npartition_key = \"subject-token:3\"",
            )
            .replace("\"orders.in.>\"", "\"orders.in.*\"");
        let other_key = format!("{several}\n[pipeline.state]\nkey = \"header:Account\"\n");
        assert!(
            parse(&other_key)
                .unwrap_err()
                .contains("is not partition_key")
        );
        let same_key = format!("{several}\n[pipeline.state]\nkey = \"subject-token:3\"\n");
        assert!(parse(&same_key).is_ok(), "{:?}", parse(&same_key).err());
        let apart = partitioned.replace(
            "dlq_subject = \"orders.dlq\"",
            "dlq_subject = \"orders.dlq\"\nstream = \"OUT\"\ndlq_stream = \"DLQ\"",
        );
        assert!(parse(&apart).unwrap_err().contains("one atomic batch"));
        let everything = partitioned.replace("\"orders.in.>\"", "\">\"");
        assert!(parse(&everything).unwrap_err().contains("progress markers"));
    }

    #[test]
    fn several_partitions_split_the_input_by_a_wildcard_token_of_its_subject() {
        let text = MINIMAL
            .replace(
                "store_dir = \"store\"",
                "partitions = 6\npartition_key = \"subject-token:4\"",
            )
            .replace("\"orders.in.>\"", "\"ord.*.in.*.>\"");
        let config = parse(&text).unwrap();
        let pipeline = &config.pipelines[0];
        let partitioning = pipeline.input_partitioning().unwrap();
        assert_eq!(partitioning.source, "ord.*.in.*.>");
        assert_eq!(
            partitioning.destination,
            "{{partition(6,2)}}.ord.{{wildcard(1)}}.in.{{wildcard(2)}}.>"
        );
        let input = pipeline.partition_input(5);
        assert_eq!(
            (
                input.consumer.as_str(),
                input.subject.as_str(),
                input.strip_partition
            ),
            ("weir-p5", "5.>", true)
        );
        assert_eq!(pipeline.partition_indexes().len(), 6);

        for (change, refusal) in [
            ("partitions = 6", "need partition_key"),
            (
                "partitions = 6\npartition_key = \"subject-token:3\"",
                "must be a `*` there",
            ),
            (
                "partitions = 6\npartition_key = \"token:4\"",
                "must be \"subject-token:N\"",
            ),
            (
                "partitions = 65\npartition_key = \"subject-token:4\"",
                "at most 64",
            ),
            (
                "partitions = 1\npartition_key = \"subject-token:4\"",
                "only with partitions above 1",
            ),
        ] {
            let text = MINIMAL
                .replace("store_dir = \"store\"", change)
                .replace("\"orders.in.>\"", "\"ord.*.in.*.>\"");
            let error = parse(&text).unwrap_err();
            assert!(error.contains(refusal), "{change}: {error}");
        }
        // One partition: the input as configured, no transform.
        let one = MINIMAL.replace("store_dir = \"store\"", "partitions = 1");
        let one = parse(&one).unwrap();
        assert!(one.pipelines[0].input_partitioning().is_none());
        assert_eq!(one.pipelines[0].partition_input(0).consumer, "weir");
    }
}
