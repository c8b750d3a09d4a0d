//! Plugin reloads, the hot swap: on SIGHUP, and on `POST /reload` of the admin port (which
//! `weir plugin deploy` calls), weir reads its configuration file again and loads each
//! pipeline's plugin file. A plugin that changed is compiled and checked exactly as at
//! start, on a blocking thread, while the old one keeps serving; only once it passes does
//! it replace the old one in each of the pipeline's partitions, which run it from their next
//! batch (weir-core's `PluginSlot` says why no input runs under both or neither). One that
//! fails leaves the old one serving and is logged and reported with why.
//!
//! Only the plugins reload: other settings that changed in the file are reported as
//! needing a restart, and the limits a plugin runs under stay those weir started with.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use weir_admin::{PipelineReload, PluginIdentity, ReloadOutcome, ReloadReport, Watched};
use weir_core::ports::PluginSlot;
use weir_sandbox::{Plugin, Sandbox};

use crate::config::{Config, ValidConfig, ValidPipeline};

/// Asks a running [`crate::run`] to reload its plugins, as SIGHUP does. Requests made while
/// a reload is under way make one more reload after it, however many they are.
#[derive(Clone, Default)]
pub struct ReloadRequests(Arc<tokio::sync::Notify>);

impl ReloadRequests {
    pub fn request(&self) {
        self.0.notify_one();
    }

    async fn requested(&self) {
        self.0.notified().await;
    }
}

/// The plugin of one partition run, as a reload replaces it.
struct Serving {
    slot: Arc<PluginSlot<Plugin>>,
    thread_share: usize,
    watched: Arc<Watched>,
}

/// A pipeline of the configuration weir started with.
struct Reloadable {
    started: ValidPipeline,
    /// Its partitions' plugins, as each starts.
    serving: Vec<Serving>,
    /// The plugin every partition is to run: the first to serve's, then each reload's. A
    /// partition that loaded another (its file changed meanwhile) gets this one as it
    /// starts serving.
    plugin: Option<Plugin>,
}

/// Every pipeline's plugins, and the reloading of them.
pub struct Reloader {
    config: ValidConfig,
    /// The configuration weir started with, without its plugin paths: what a reload
    /// compares the file with to tell of settings that need a restart. `None` if it cannot
    /// be read again.
    settings: Option<toml::Value>,
    sandbox: Arc<Sandbox>,
    pipelines: Mutex<BTreeMap<String, Reloadable>>,
    /// One reload at a time: a second waits for the first.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(config: &ValidConfig, sandbox: Arc<Sandbox>) -> Reloader {
        let pipelines = config
            .pipelines()
            .iter()
            .map(|pipeline| {
                let reloadable = Reloadable {
                    started: pipeline.clone(),
                    serving: Vec::new(),
                    plugin: None,
                };
                (pipeline.config().name.clone(), reloadable)
            })
            .collect();
        Reloader {
            config: config.clone(),
            settings: settings_of(config.source()),
            sandbox,
            pipelines: Mutex::new(pipelines),
            one_at_a_time: tokio::sync::Mutex::default(),
        }
    }

    /// Reloads whenever `requests` asks, until the process ends.
    pub async fn serve(&self, requests: ReloadRequests) {
        loop {
            requests.requested().await;
            self.reload(None).await;
        }
    }

    /// Registers a partition run of `pipeline` whose plugin now serves from `slot`.
    pub fn serving(
        &self,
        pipeline: &str,
        slot: Arc<PluginSlot<Plugin>>,
        thread_share: usize,
        watched: Arc<Watched>,
    ) {
        let mut pipelines = lock(&self.pipelines);
        let Some(reloadable) = pipelines.get_mut(pipeline) else {
            return;
        };
        let serving = Serving {
            slot,
            thread_share,
            watched,
        };
        match &reloadable.plugin {
            Some(plugin) if slot_sha256(&serving.slot) != plugin.sha256() => {
                swap(&serving, plugin);
            }
            Some(_) => {}
            None => reloadable.plugin = Some((*serving.slot.current()).clone()),
        }
        reloadable.serving.push(serving);
    }

    /// Reads the configuration file again and reloads every pipeline's plugin, or only
    /// `only`'s. Each outcome is logged as well as reported.
    pub async fn reload(&self, only: Option<String>) -> ReloadReport {
        let _one = self.one_at_a_time.lock().await;
        let source = self.config.source();
        tracing::info!(config = %source.display(), pipeline = ?only, "reloading plugins");
        let report = self.reload_from(source, only).await;
        if let Some(error) = &report.error {
            tracing::error!(%error, "reload failed; every pipeline keeps the plugin it runs");
        }
        if let Some(restart) = &report.restart_needed {
            tracing::warn!("{restart}");
        }
        report
    }

    async fn reload_from(&self, source: &Path, only: Option<String>) -> ReloadReport {
        let config = match Config::load(source) {
            Ok(config) => config,
            Err(error) => return ReloadReport::failed(error.to_string()),
        };
        let started: Vec<String> = lock(&self.pipelines).keys().cloned().collect();
        let names = match only {
            None => started,
            Some(name) if started.contains(&name) => vec![name],
            Some(name) => {
                return ReloadReport::failed(format!(
                    "this weir runs no pipeline {name:?} (it runs {}); a new pipeline needs a restart",
                    started.join(", ")
                ));
            }
        };
        let mut pipelines = Vec::new();
        for name in names {
            let outcome = match config
                .pipelines()
                .iter()
                .find(|pipeline| pipeline.config().name == name)
            {
                Some(now) => self.reload_pipeline(&name, now).await,
                None => ReloadOutcome::Refused {
                    reason: format!(
                        "{} no longer has pipeline {name:?}; removing a pipeline needs a restart",
                        source.display()
                    ),
                },
            };
            pipelines.push(PipelineReload {
                pipeline: name,
                outcome,
            });
        }
        let restart_needed = match (&self.settings, settings_of(source)) {
            (Some(started), Some(now)) if *started != now => Some(format!(
                "settings other than the plugins changed in {}: they apply when weir restarts",
                source.display()
            )),
            _ => None,
        };
        ReloadReport {
            error: None,
            pipelines,
            restart_needed,
        }
    }

    /// Loads and checks the plugin `now` names for pipeline `name`, and makes it the one
    /// every partition runs: those serving another from their next batch, those still
    /// starting as they start.
    async fn reload_pipeline(&self, name: &str, now: &ValidPipeline) -> ReloadOutcome {
        let started = lock(&self.pipelines)[name].started.clone();
        let path = now.config().plugin.clone();
        // Compiling blocks (for seconds, for a large component): on a thread of its own,
        // under the limits weir started with, which its engine is sized for.
        let loading = {
            let (sandbox, limits) = (self.sandbox.clone(), started.config().limits.clone());
            tokio::task::spawn_blocking(move || sandbox.load(&path, &limits))
        };
        let plugin = match loading.await {
            Ok(Ok(plugin)) => plugin,
            Ok(Err(error)) => return refused(name, error.to_string()),
            Err(error) => return refused(name, format!("loading it failed: {error}")),
        };
        let fits = crate::StartError::unless_contract_fits(
            started.config(),
            &now.config().plugin,
            &plugin,
        );
        if let Err(unfit) = fits {
            return refused(name, unfit.to_string());
        }
        let to = plugin.sha256().to_owned();
        let mut pipelines = lock(&self.pipelines);
        let reloadable = pipelines
            .get_mut(name)
            .expect("a pipeline weir started with");
        let mut replaced = BTreeSet::new();
        for serving in &reloadable.serving {
            let running = slot_sha256(&serving.slot);
            if running != to {
                swap(serving, &plugin);
                replaced.insert(running);
            }
        }
        let starting = reloadable.serving.is_empty();
        reloadable.plugin = Some(plugin);
        if starting {
            return ReloadOutcome::Starting;
        }
        let Some(from) = replaced.first().cloned() else {
            return ReloadOutcome::Unchanged { sha256: to };
        };
        tracing::info!(
            pipeline = name,
            from = %from,
            to = %to,
            plugin = %now.config().plugin.display(),
            "plugin swapped: each partition runs the new one from its next batch"
        );
        // Replaced code goes once the batches in hand are done with it, unless another
        // pipeline runs it too.
        for running in &replaced {
            let still_run = pipelines
                .values()
                .flat_map(|reloadable| &reloadable.serving)
                .any(|serving| slot_sha256(&serving.slot) == *running);
            if !still_run {
                self.sandbox.release(running);
            }
        }
        ReloadOutcome::Swapped { from, to }
    }
}

impl weir_admin::Reload for Reloader {
    fn reload(
        &self,
        pipeline: Option<String>,
    ) -> Pin<Box<dyn Future<Output = ReloadReport> + Send + '_>> {
        Box::pin(Reloader::reload(self, pipeline))
    }
}

fn refused(pipeline: &str, reason: String) -> ReloadOutcome {
    tracing::error!(pipeline, %reason, "new plugin refused; the old one keeps serving");
    ReloadOutcome::Refused { reason }
}

/// Makes `plugin` the one `serving`'s partition runs from its next batch.
fn swap(serving: &Serving, plugin: &Plugin) {
    let new = plugin.clone().with_thread_share(serving.thread_share);
    serving
        .watched
        .metrics
        .plugin_loaded(new.sha256(), new.contract());
    serving.watched.set_plugin(PluginIdentity {
        sha256: new.sha256().to_owned(),
        contract: new.contract().to_owned(),
    });
    let old = serving.slot.replace(new);
    serving
        .watched
        .metrics
        .plugin_unloaded(old.sha256(), old.contract());
}

fn slot_sha256(slot: &PluginSlot<Plugin>) -> String {
    slot.current().sha256().to_owned()
}

/// The configuration file's settings without its plugin paths, or `None` if it cannot be
/// read or parsed (which loading it reports).
fn settings_of(source: &Path) -> Option<toml::Value> {
    let text = std::fs::read_to_string(source).ok()?;
    let mut settings: toml::Value = toml::from_str(&text).ok()?;
    if let Some(pipelines) = settings
        .get_mut("pipeline")
        .and_then(toml::Value::as_array_mut)
    {
        for pipeline in pipelines.iter_mut().filter_map(toml::Value::as_table_mut) {
            pipeline.remove("plugin");
        }
    }
    Some(settings)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
