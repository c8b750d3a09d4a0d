//! One pipeline, wired: its plugin (the sandbox), its store (RocksDB), its streams and
//! consumer (NATS), checked and prepared before anything is consumed, then handed to the
//! message path of `weir_core::pipeline`, which decides everything and keeps the
//! exactly-once invariant.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_core::dead_letter::DeadLetterSchema;
use weir_core::pipeline::{Fatal, Settings};
use weir_core::policy::{MAX_STORED_MESSAGE, OutputPolicy};
use weir_core::stats::Stats;

use crate::config::{Delivery, ValidPipeline};
use crate::fault::FaultProbe;
use crate::{Error, StartError};
use weir_nats::{Broker, MessageSource, Publisher};
use weir_sandbox::{Plugin, Sandbox};
use weir_store::Store;

/// A pipeline whose plugin, store, streams and consumer are all in place.
pub struct Pipeline {
    path: weir_core::pipeline::Pipeline<Store, Publisher, Plugin, FaultProbe>,
    source: MessageSource,
}

impl Pipeline {
    /// Checks and prepares everything before anything is consumed: the plugin, the store
    /// (and its lock), the server, the streams and the consumer. Its plugin runs on at most
    /// `thread_share` of the sandbox's threads at once.
    pub async fn start(
        pipeline: ValidPipeline,
        sandbox: &Arc<Sandbox>,
        thread_share: usize,
    ) -> Result<Pipeline, Error> {
        let config = pipeline.config();
        let fail = |source: StartError| Error::Start {
            pipeline: config.name.clone(),
            source,
        };
        // Compiling blocks (for seconds, for a large component): on a thread of its own.
        let loading = {
            let (sandbox, plugin, limits) = (
                sandbox.clone(),
                config.plugin.clone(),
                config.limits.clone(),
            );
            tokio::task::spawn_blocking(move || sandbox.load(&plugin, &limits))
        };
        let plugin = loading
            .await
            .map_err(|e| Error::Crashed {
                pipeline: config.name.clone(),
                message: format!("loading the plugin: {e}"),
            })?
            .map_err(|e| fail(e.into()))?
            .with_thread_share(thread_share);
        let store = match pipeline.delivery() {
            Delivery::ExactlyOnce { store_dir } => Some(Arc::new(
                Store::open(store_dir, config.store_settings()).map_err(|e| fail(e.into()))?,
            )),
            Delivery::AtLeastOnce => None,
        };
        let broker = Broker::connect(&config.nats, &format!("weir-{}", config.name))
            .await
            .map_err(|e| fail(e.into()))?;
        // A cluster may not answer for seconds (electing leaders after a node died): the
        // set-up waits for it as the connection waits for a restarting server.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(config.nats.connect_timeout_ms);
        answered(deadline, || broker.ensure_input_stream(&config.input))
            .await
            .map_err(|e| fail(e.into()))?;
        answered(deadline, || broker.ensure_output_streams(&config.output))
            .await
            .map_err(|e| fail(e.into()))?;
        // What the server and the streams accept, checked before publishing rather than
        // learnt from a refusal.
        let message_limit = async |subject: &str| -> Result<usize, Error> {
            let stream_limit = answered(deadline, || broker.stream_message_limit(subject))
                .await
                .map_err(|e| fail(e.into()))?;
            Ok([broker.max_payload(), MAX_STORED_MESSAGE]
                .into_iter()
                .chain(stream_limit)
                .min()
                .unwrap_or(MAX_STORED_MESSAGE))
        };
        let output_limit = message_limit(&format!("{}.probe", config.output.prefix)).await?;
        let dlq_limit = message_limit(&config.output.dlq_subject).await?;
        let source = answered(deadline, || broker.consume(&config.input, &config.batch))
            .await
            .map_err(|e| fail(e.into()))?;
        // What a previous weir on this consumer pulled and never finished is handed out
        // again at once, not after ack_wait: the store tells which of it is done.
        if let Delivery::ExactlyOnce { .. } = pipeline.delivery() {
            match broker.redeliver_pending(&config.input).await {
                Ok(0) => {}
                Ok(held) => tracing::info!(
                    held,
                    "inputs a previous run delivered and never acked are redelivered now"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    "inputs a previous run held wait out input.ack_wait_ms"
                ),
            }
        }
        tracing::info!(
            plugin = %config.plugin.display(),
            plugin_sha256 = plugin.sha256(),
            mode = ?config.mode,
            stream = %config.input.stream,
            "pipeline ready"
        );
        let path = weir_core::pipeline::Pipeline {
            settings: Settings {
                name: config.name.clone(),
                dedup: config.dedup,
                input_stream: config.input.stream.clone(),
                ack_wait: Duration::from_millis(config.input.ack_wait_ms),
            },
            policy: OutputPolicy {
                pipeline: config.name.clone(),
                prefix: config.output.prefix.clone(),
                max_outputs: config.limits.max_outputs,
                max_output_bytes: config.limits.max_output_bytes,
                max_message_bytes: output_limit,
            },
            dead_letters: DeadLetterSchema {
                pipeline: config.name.clone(),
                dlq_subject: config.output.dlq_subject.clone(),
                input_stream: config.input.stream.clone(),
                plugin_sha256: plugin.sha256().to_owned(),
                max_message_bytes: dlq_limit,
            },
            publisher: broker.publisher(),
            runtime: plugin,
            store,
            probe: FaultProbe,
            stats: Arc::default(),
        };
        Ok(Pipeline { path, source })
    }

    pub fn name(&self) -> &str {
        &self.path.settings.name
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.path.stats.clone()
    }

    /// Runs until `shutdown` fires, then finishes the batches in hand and returns. Returns
    /// an error only for a fault that retrying cannot heal (a corrupt store, a host bug).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let pipeline = self.path.settings.name.clone();
        self.path
            .run(self.source, shutdown)
            .await
            .map_err(|fatal| match fatal {
                Fatal::Store(source) => Error::Stopped { pipeline, source },
                Fatal::PluginCrashed(message) => Error::Crashed { pipeline, message },
            })
    }
}

/// Runs a start-up request again while the server does not answer it in time
/// (`BrokerError::is_unanswered`), as long as the failed attempt began before `deadline`.
async fn answered<T, F>(
    deadline: tokio::time::Instant,
    mut request: impl FnMut() -> F,
) -> Result<T, weir_nats::BrokerError>
where
    F: Future<Output = Result<T, weir_nats::BrokerError>>,
{
    loop {
        // Compared with when the request began: one that times out (10 s) past the deadline
        // is still asked again once.
        let began = tokio::time::Instant::now();
        match request().await {
            Err(error) if error.is_unanswered() && began < deadline => {
                tracing::info!(%error, "the server does not answer yet (a cluster electing its leaders?); retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            result => return result,
        }
    }
}
