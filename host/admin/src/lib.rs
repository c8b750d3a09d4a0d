//! weir-admin: the admin port of `weir run`, on axum. `GET /metrics` (Prometheus text),
//! `/healthz` (liveness), `/readyz` (readiness, 503 naming each pipeline that is not ready
//! and why), `/status` (the same facts as JSON, for scripts and `weir status`), `/history`
//! (the last ten minutes of rates and lag) and `/` (the status page, `status.html`, which
//! polls the last two). `POST /reload[?pipeline=P]` has the wiring's [`Reload`] load the
//! plugins again (as SIGHUP does) and answers what became of each, as a [`ReloadReport`].
//! It reads weir-core's metrics and status and decides nothing: what is counted, and what
//! "ready" means, is the core's. Also the small client `weir status` and `weir plugin
//! deploy` call it with.
//!
//! **Boundary:** the only crate that imports axum (and hyper); it reaches no other adapter.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use weir_core::metrics::{Metrics, PipelineMetrics};
use weir_core::status::PipelineStatus;

/// The address the admin port listens on unless configured otherwise: loopback only, a
/// port outside the range Prometheus allocates to exporters (9100-9999, all taken).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7464";

/// How often the history behind rates (and the status page's charts) is sampled, and how
/// much of it is kept: ten minutes.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const SAMPLES_KEPT: usize = 600;
/// Inputs per second are averaged over this many samples.
const RATE_WINDOW: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot listen on admin.listen = {address:?}: {source} (is another weir running with it? set [admin] listen to a free address, or to \"\" to turn the admin port off)"
    )]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {url}: {reason} (is `weir run` running with its admin port there?)")]
    Fetch { url: String, reason: String },
    /// Connected, and no answer came in time: the request may still be under way.
    #[error("{url} did not answer within {} s", waited.as_secs())]
    NoAnswer { url: String, waited: Duration },
}

/// What a pipeline's plugin is, once it is loaded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PluginIdentity {
    pub sha256: String,
    pub contract: String,
}

/// One pipeline, as the admin port sees it.
#[derive(Debug)]
pub struct Watched {
    pub name: String,
    pub metrics: PipelineMetrics,
    pub status: Arc<PipelineStatus>,
    /// Set by the wiring once the plugin is loaded, and again when a reload swaps it.
    plugin: Mutex<Option<PluginIdentity>>,
    pub store_dir: Option<String>,
    /// The last few dead letters in the DLQ stream, newest first, as the wiring last read
    /// them (the stream, not this process, is their record: they survive a restart and
    /// leave when replayed).
    pub recent_dead_letters: Mutex<Vec<RecentDeadLetter>>,
}

impl Watched {
    /// A pipeline about to start, with nothing counted yet in `metrics`, its series.
    pub fn new(name: String, store_dir: Option<String>, metrics: PipelineMetrics) -> Watched {
        Watched {
            name,
            metrics,
            status: Arc::default(),
            plugin: Mutex::default(),
            store_dir,
            recent_dead_letters: Mutex::default(),
        }
    }

    /// The plugin the pipeline runs now.
    pub fn plugin(&self) -> Option<PluginIdentity> {
        self.plugin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_plugin(&self, plugin: PluginIdentity) {
        *self.plugin.lock().unwrap_or_else(|e| e.into_inner()) = Some(plugin);
    }

    fn recent_dead_letters(&self) -> Vec<RecentDeadLetter> {
        self.recent_dead_letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How many of the last dead letters the status shows.
pub const RECENT_DEAD_LETTERS: usize = 5;

/// One dead letter, as the status shows it. Its text is the plugin's and the input's, as
/// stored: whoever displays it escapes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecentDeadLetter {
    /// Its sequence in the DLQ stream: `weir dlq show` takes it.
    pub sequence: u64,
    /// When the DLQ stream stored it, in milliseconds since the Unix epoch.
    pub stored_unix_ms: u64,
    pub kind: String,
    pub reason: String,
    /// The input's coordinates: stream, sequence and subject.
    pub input_stream: String,
    pub input_sequence: String,
    pub input_subject: String,
}

/// One sample of a pipeline's counters and lag, for rates and charts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub acked: u64,
    pub dead_lettered: u64,
    pub lag: i64,
}

/// The process's admin state: the registry every pipeline's metrics are in, and each
/// pipeline's status and history.
pub struct Admin {
    registry: Registry,
    pipelines: Vec<Arc<Watched>>,
    history: Mutex<Vec<VecDeque<Sample>>>,
    version: String,
    reload: Option<Arc<dyn Reload>>,
}

/// What reloads the plugins when `POST /reload` asks: the wiring's, as SIGHUP does.
pub trait Reload: Send + Sync + 'static {
    /// Loads every pipeline's plugin again, or only `pipeline`'s, swapping in each that
    /// changed and passes its checks, and says what became of each.
    fn reload(
        &self,
        pipeline: Option<String>,
    ) -> Pin<Box<dyn Future<Output = ReloadReport> + Send + '_>>;
}

/// What a reload did, pipeline by pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Why nothing was reloaded (the configuration cannot be read, no such pipeline).
    pub error: Option<String>,
    pub pipelines: Vec<PipelineReload>,
    /// Settings other than the plugins that changed in the configuration: they apply only
    /// when weir restarts.
    pub restart_needed: Option<String>,
}

impl ReloadReport {
    /// A reload that did nothing, because of `error`.
    pub fn failed(error: String) -> ReloadReport {
        ReloadReport {
            error: Some(error),
            pipelines: Vec::new(),
            restart_needed: None,
        }
    }

    /// Whether every pipeline asked for runs the plugin its file holds.
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
            && self
                .pipelines
                .iter()
                .all(|pipeline| !matches!(pipeline.outcome, ReloadOutcome::Refused { .. }))
    }
}

/// What a reload did to one pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PipelineReload {
    pub pipeline: String,
    pub outcome: ReloadOutcome,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ReloadOutcome {
    /// Its plugin file holds the plugin it runs.
    Unchanged { sha256: String },
    /// The new plugin passed its checks and runs from each partition's next batch.
    Swapped { from: String, to: String },
    /// The new plugin cannot run, for `reason`: the old one keeps serving.
    Refused { reason: String },
    /// None of its partitions serves yet: each runs the new plugin once started.
    Starting,
}

impl Admin {
    /// Registers `metrics` (every pipeline's), and weir's version.
    pub fn new(version: &str, metrics: &Metrics, pipelines: Vec<Arc<Watched>>) -> Admin {
        let mut registry = Registry::with_prefix("weir");
        registry.register(
            "build",
            "The weir build serving these metrics",
            Info::new(vec![("version", version.to_owned())]),
        );
        metrics.register(&mut registry);
        let history = Mutex::new(vec![VecDeque::new(); pipelines.len()]);
        Admin {
            registry,
            pipelines,
            history,
            version: version.to_owned(),
            reload: None,
        }
    }

    /// Has `POST /reload` call `reload`; without one, it answers that this process cannot
    /// reload.
    pub fn with_reload(mut self, reload: Arc<dyn Reload>) -> Admin {
        self.reload = Some(reload);
        self
    }

    /// The metrics in Prometheus' text format (OpenMetrics 1.0).
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    fn sample(&self) {
        let at = unix_now();
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        for (watched, samples) in self.pipelines.iter().zip(history.iter_mut()) {
            let snapshot = watched.metrics.snapshot();
            samples.push_back(Sample {
                at,
                acked: snapshot.acked,
                dead_lettered: snapshot.dead_lettered,
                lag: watched.metrics.consumer_pending.get(),
            });
            if samples.len() > SAMPLES_KEPT {
                samples.pop_front();
            }
        }
    }

    /// Every fact of `/status`.
    pub fn report(&self) -> StatusReport {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let pipelines: Vec<PipelineReport> = self
            .pipelines
            .iter()
            .zip(history.iter())
            .map(|(watched, samples)| pipeline_report(watched, samples))
            .collect();
        StatusReport {
            version: self.version.clone(),
            ready: pipelines.iter().all(|pipeline| pipeline.ready),
            pipelines,
        }
    }

    /// The samples of the last ten minutes, per pipeline.
    pub fn history(&self) -> BTreeMap<String, Vec<Sample>> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        self.pipelines
            .iter()
            .zip(history.iter())
            .map(|(watched, samples)| (watched.name.clone(), samples.iter().copied().collect()))
            .collect()
    }
}

fn pipeline_report(watched: &Watched, samples: &VecDeque<Sample>) -> PipelineReport {
    let status = watched.status.snapshot();
    let not_ready_because = status.not_ready_because();
    let counters = watched.metrics.snapshot();
    let metrics = &watched.metrics;
    // Over the last RATE_WINDOW samples, or all there are when the pipeline is younger.
    let earliest = samples.iter().rev().nth(RATE_WINDOW).or(samples.front());
    let inputs_per_second = match (samples.back(), earliest) {
        (Some(last), Some(earlier)) if last.at > earlier.at => {
            (last.acked - earlier.acked) as f64 / (last.at - earlier.at)
        }
        _ => 0.0,
    };
    PipelineReport {
        name: watched.name.clone(),
        phase: status.phase.as_str().to_owned(),
        ready: not_ready_because.is_none(),
        not_ready_because,
        connected: status.connected,
        retrying: status
            .retrying
            .into_iter()
            .map(|(step, error)| Retrying {
                step: step.to_owned(),
                error,
            })
            .collect(),
        inputs_per_second,
        received: counters.received,
        executed: counters.executed,
        deduplicated: counters.deduplicated,
        published: counters.published,
        acked: counters.acked,
        dead_letters: metrics
            .dead_letters_by_kind()
            .into_iter()
            .map(|(kind, count)| (kind.to_owned(), count))
            .collect(),
        lag: metrics.consumer_pending.get(),
        ack_pending: metrics.consumer_ack_pending.get(),
        redelivered: metrics.consumer_redelivered.get(),
        recent_dead_letters: watched.recent_dead_letters(),
        plugin: watched.plugin(),
        store_dir: watched.store_dir.clone(),
        store_bytes: metrics.store_bytes.get(),
        store_keys: metrics.store_keys.get(),
    }
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    /// Every pipeline ready.
    pub ready: bool,
    pub pipelines: Vec<PipelineReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineReport {
    pub name: String,
    /// starting, replaying, taking-over, running or stopped.
    pub phase: String,
    pub ready: bool,
    pub not_ready_because: Option<String>,
    pub connected: bool,
    pub retrying: Vec<Retrying>,
    /// Inputs acked per second, over the last ten seconds.
    pub inputs_per_second: f64,
    pub received: u64,
    pub executed: u64,
    pub deduplicated: u64,
    pub published: u64,
    pub acked: u64,
    /// Dead letters by kind, since start.
    pub dead_letters: BTreeMap<String, u64>,
    /// The last few in the DLQ stream, newest first, whenever they were made.
    pub recent_dead_letters: Vec<RecentDeadLetter>,
    /// The consumer's own counts, polled every few seconds: not yet delivered (the lag),
    /// delivered and unacknowledged, redelivered.
    pub lag: i64,
    pub ack_pending: i64,
    pub redelivered: i64,
    pub plugin: Option<PluginIdentity>,
    pub store_dir: Option<String>,
    pub store_bytes: i64,
    pub store_keys: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Retrying {
    pub step: String,
    pub error: String,
}

/// Binds the admin port, so that an address in use is refused before anything starts.
pub async fn bind(address: &str) -> Result<tokio::net::TcpListener, AdminError> {
    let listen = |source| AdminError::Listen {
        address: address.to_owned(),
        source,
    };
    let parsed: SocketAddr = address.parse().map_err(|e| {
        listen(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not an address and port: {e}"),
        ))
    })?;
    tokio::net::TcpListener::bind(parsed).await.map_err(listen)
}

/// Serves the admin port on `listener` until `shutdown` fires, sampling the history meanwhile.
pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
) {
    let sampler = {
        let (admin, shutdown) = (admin.clone(), shutdown.clone());
        async move {
            let mut ticker = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = ticker.tick() => admin.sample(),
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    let router = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/history", get(history))
        .route("/reload", axum::routing::post(reload))
        .with_state(admin);
    let server = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned());
    let (served, ()) = tokio::join!(server, sampler);
    if let Err(error) = served {
        tracing::warn!(%error, "the admin port stopped");
    }
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        admin.metrics_text(),
    )
        .into_response()
}

/// The status page: one file, built into the binary.
const STATUS_PAGE: &str = include_str!("status.html");

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page loads nothing from elsewhere, and nothing else may run in it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        STATUS_PAGE,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let report = admin.report();
    let not_ready: Vec<serde_json::Value> = report
        .pipelines
        .iter()
        .filter_map(|pipeline| {
            let because = pipeline.not_ready_because.as_ref()?;
            Some(serde_json::json!({ "pipeline": pipeline.name, "because": because }))
        })
        .collect();
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "ready": report.ready, "not_ready": not_ready });
    (code, axum::Json(body)).into_response()
}

async fn status(State(admin): State<Arc<Admin>>) -> axum::Json<StatusReport> {
    axum::Json(admin.report())
}

async fn history(State(admin): State<Arc<Admin>>) -> axum::Json<BTreeMap<String, Vec<Sample>>> {
    axum::Json(admin.history())
}

#[derive(Deserialize)]
struct ReloadQuery {
    pipeline: Option<String>,
}

/// 200 when every pipeline asked for runs the plugin its file holds, 422 otherwise (the
/// report says why).
async fn reload(State(admin): State<Arc<Admin>>, Query(query): Query<ReloadQuery>) -> Response {
    let report = match admin.reload.clone() {
        // On a task of its own: a client that goes away does not cancel a reload half done.
        Some(reload) => tokio::spawn(async move { reload.reload(query.pipeline).await })
            .await
            .unwrap_or_else(|e| ReloadReport::failed(format!("the reload failed: {e}"))),
        None => ReloadReport::failed("this process does not reload plugins".into()),
    };
    let code = match report.succeeded() {
        true => StatusCode::OK,
        false => StatusCode::UNPROCESSABLE_ENTITY,
    };
    (code, axum::Json(report)).into_response()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// `GET path` from the admin port at `address` (`host:port`, or with `http://`): the status
/// code and body.
pub async fn fetch(address: &str, path: &str) -> Result<(u16, String), AdminError> {
    exchange(address, "GET", path, Duration::from_secs(10)).await
}

/// `POST path` (with no body) to the admin port at `address`, waiting up to `patience` for
/// the answer: the status code and body.
pub async fn post(
    address: &str,
    path: &str,
    patience: Duration,
) -> Result<(u16, String), AdminError> {
    exchange(address, "POST", path, patience).await
}

/// One request to the admin port. HTTP/1.0, which the server answers with a length and a
/// close: enough for its own port, and no HTTP client to depend on.
async fn exchange(
    address: &str,
    method: &str,
    path: &str,
    patience: Duration,
) -> Result<(u16, String), AdminError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = address.trim_start_matches("http://").trim_end_matches('/');
    let url = format!("http://{host}{path}");
    let failed = |reason: String| AdminError::Fetch {
        url: url.clone(),
        reason,
    };
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(host),
    )
    .await
    .map_err(|_elapsed| failed("no connection within 10 s".into()))?
    .map_err(|e| failed(e.to_string()))?;
    let exchange = async {
        let request =
            format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(response)
    };
    let response = tokio::time::timeout(patience, exchange)
        .await
        .map_err(|_elapsed| AdminError::NoAnswer {
            url: url.clone(),
            waited: patience,
        })??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| failed("not an HTTP response".into()))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| failed(format!("not an HTTP status line: {head:?}")))?;
    Ok((code, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(acked: &[u64]) -> VecDeque<Sample> {
        acked
            .iter()
            .enumerate()
            .map(|(second, &acked)| Sample {
                at: 1_000.0 + second as f64,
                acked,
                dead_lettered: 0,
                lag: 0,
            })
            .collect()
    }

    #[test]
    fn the_rate_is_over_the_last_ten_seconds_or_all_a_young_pipeline_has() {
        let watched = Watched::new("p".into(), None, PipelineMetrics::default());
        let rate = |acked: &[u64]| pipeline_report(&watched, &samples(acked)).inputs_per_second;
        assert_eq!(rate(&[]), 0.0);
        assert_eq!(rate(&[50]), 0.0, "one sample is no rate");
        assert_eq!(rate(&[0, 100, 300]), 150.0);
        // Twelve samples: a burst of 1 000 in the first second, then 10 a second; the burst
        // is out of the window.
        let after_a_burst: Vec<u64> = std::iter::once(0)
            .chain((0..11).map(|second| 1_000 + second * 10))
            .collect();
        assert_eq!(rate(&after_a_burst), 10.0);
    }

    #[test]
    fn each_metric_is_described_once_with_a_series_per_pipeline() {
        let metrics = Metrics::default();
        let pipelines: Vec<Arc<Watched>> = ["orders", "refunds"]
            .into_iter()
            .map(|name| Arc::new(Watched::new(name.into(), None, metrics.pipeline(name))))
            .collect();
        pipelines[0].metrics.received.inc_by(3);
        pipelines[1].metrics.received.inc_by(5);
        pipelines[1].metrics.retry("commit");
        let text = Admin::new("0.0.0", &metrics, pipelines).metrics_text();
        let mut described = std::collections::BTreeSet::new();
        for line in text.lines().filter(|line| line.starts_with("# TYPE ")) {
            assert!(described.insert(line), "{line:?} twice in:\n{text}");
        }
        assert!(described.contains("# TYPE weir_inputs_received counter"));
        assert!(text.contains("weir_inputs_received_total{pipeline=\"orders\"} 3\n"));
        assert!(text.contains("weir_inputs_received_total{pipeline=\"refunds\"} 5\n"));
        assert!(text.contains("weir_retries_total{pipeline=\"refunds\",step=\"commit\"} 1\n"));
    }
}
