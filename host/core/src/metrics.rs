//! What a pipeline did, as Prometheus metrics: counted where the core decides, registered by
//! the wiring under the pipeline's label, read by the admin server and the stop log.
//!
//! Names follow Prometheus practice: base units (seconds), `_total` on counters (the
//! encoder adds it), labels of low cardinality only (`kind`, `step`, `stage`: never a
//! subject or a key). The gauges are set from outside the message path: the consumer's own
//! info and the store's properties, polled by the wiring.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::plugin::FailureKind;

/// A dead letter's kind, as its `Weir-Dlq-Kind` header spells it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// A step of the message path that retries a transient fault.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub step: &'static str,
}

/// A stage of a batch's way through the pipeline.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: &'static str,
}

/// What a pipeline's plugin is: `weir_plugin_info` is 1 with these labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub sha256: String,
    pub contract: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// One pipeline's metrics. Cloning shares them.
#[derive(Clone, Debug)]
pub struct PipelineMetrics {
    pub received: Counter,
    pub executed: Counter,
    pub deduplicated: Counter,
    pub dead_lettered: Family<KindLabel, Counter>,
    pub published: Counter,
    pub acked: Counter,
    pub handed_back: Counter,
    pub retries: Family<StepLabel, Counter>,
    pub reconnects: Counter,
    pub plugin_call_seconds: Histogram,
    pub plugin_fuel: Histogram,
    pub batch_inputs: Histogram,
    pub stage_seconds: Histograms<StageLabel>,
    pub end_to_end_seconds: Histogram,
    pub consumer_pending: Gauge,
    pub consumer_ack_pending: Gauge,
    pub consumer_redelivered: Gauge,
    pub store_keys: Gauge,
    pub store_bytes: Gauge,
    pub store_block_cache_bytes: Gauge,
    pub plugin_info: Family<PluginLabels, Gauge>,
}

/// 100 µs to ~100 s, for plugin calls and stages alike.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

impl Default for PipelineMetrics {
    fn default() -> PipelineMetrics {
        PipelineMetrics {
            received: Counter::default(),
            executed: Counter::default(),
            deduplicated: Counter::default(),
            dead_lettered: Family::default(),
            published: Counter::default(),
            acked: Counter::default(),
            handed_back: Counter::default(),
            retries: Family::default(),
            reconnects: Counter::default(),
            plugin_call_seconds: seconds(),
            // 1 000 to ~4 billion instructions' worth.
            plugin_fuel: Histogram::new(exponential_buckets(1000.0, 4.0, 12)),
            batch_inputs: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            stage_seconds: Family::new_with_constructor(seconds),
            end_to_end_seconds: Histogram::new(exponential_buckets(0.001, 4.0, 11)),
            consumer_pending: Gauge::default(),
            consumer_ack_pending: Gauge::default(),
            consumer_redelivered: Gauge::default(),
            store_keys: Gauge::default(),
            store_bytes: Gauge::default(),
            store_block_cache_bytes: Gauge::default(),
            plugin_info: Family::default(),
        }
    }
}

impl PipelineMetrics {
    /// Registers every metric in `registry` (the pipeline's sub-registry, which adds its
    /// label), names without the `weir_` prefix the root registry adds.
    pub fn register(&self, registry: &mut Registry) {
        let counters: [(&str, &str, &Counter); 7] = [
            (
                "inputs_received",
                "Inputs the consumer delivered, redeliveries included",
                &self.received,
            ),
            (
                "inputs_executed",
                "Inputs the plugin ran on",
                &self.executed,
            ),
            (
                "inputs_deduplicated",
                "Redelivered inputs found done in the store: the plugin did not run again",
                &self.deduplicated,
            ),
            (
                "messages_published",
                "Outputs and dead letters JetStream acknowledged, re-publishes included",
                &self.published,
            ),
            ("inputs_acked", "Inputs acknowledged", &self.acked),
            (
                "inputs_handed_back",
                "Inputs handed back unprocessed (a nak) when the pipeline stopped",
                &self.handed_back,
            ),
            (
                "reconnects",
                "Times the connection to NATS was re-established",
                &self.reconnects,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "inputs_dead_lettered",
            "Inputs committed as dead letters, by kind",
            self.dead_lettered.clone(),
        );
        registry.register(
            "retries",
            "Transient faults retried, by step",
            self.retries.clone(),
        );
        registry.register_with_unit(
            "plugin_call",
            "Time of one plugin call, instantiation included",
            Unit::Seconds,
            self.plugin_call_seconds.clone(),
        );
        registry.register(
            "plugin_fuel",
            "Fuel one plugin call used (about one unit per wasm instruction)",
            self.plugin_fuel.clone(),
        );
        registry.register(
            "batch_inputs",
            "Inputs in one batch",
            self.batch_inputs.clone(),
        );
        registry.register_with_unit(
            "stage",
            "Time a batch spent in a stage: execute, commit, publish or ack",
            Unit::Seconds,
            self.stage_seconds.clone(),
        );
        registry.register_with_unit(
            "end_to_end",
            "Time from an input's storing in its stream to its ack",
            Unit::Seconds,
            self.end_to_end_seconds.clone(),
        );
        let gauges: [(&str, &str, &Gauge); 6] = [
            (
                "consumer_pending_messages",
                "Inputs in the stream not yet delivered to the consumer (its lag)",
                &self.consumer_pending,
            ),
            (
                "consumer_ack_pending_messages",
                "Inputs delivered and not yet acknowledged",
                &self.consumer_ack_pending,
            ),
            (
                "consumer_redelivered_messages",
                "Inputs delivered more than once and not yet acknowledged",
                &self.consumer_redelivered,
            ),
            (
                "store_estimated_keys",
                "Records in the dedup store (RocksDB's estimate)",
                &self.store_keys,
            ),
            (
                "store_size_bytes",
                "Size of the dedup store's files on disk",
                &self.store_bytes,
            ),
            (
                "store_block_cache_bytes",
                "Memory the dedup store's block cache holds",
                &self.store_block_cache_bytes,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "plugin_info",
            "The pipeline's plugin: its sha256 and the contract it exports (always 1)",
            self.plugin_info.clone(),
        );
    }

    /// Records which plugin the pipeline runs.
    pub fn plugin_loaded(&self, sha256: &str, contract: &str) {
        let labels = PluginLabels {
            sha256: sha256.to_owned(),
            contract: contract.to_owned(),
        };
        self.plugin_info.get_or_create(&labels).set(1);
    }

    /// Counts one dead letter of `kind`.
    pub fn dead_letter(&self, kind: FailureKind) {
        self.dead_lettered
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Dead letters by kind, in `FailureKind::ALL` order, kinds never seen left out.
    pub fn dead_letters_by_kind(&self) -> Vec<(&'static str, u64)> {
        FailureKind::ALL
            .into_iter()
            .filter_map(|kind| {
                let label = KindLabel {
                    kind: kind.as_str(),
                };
                let count = self.dead_lettered.get(&label)?.get();
                Some((kind.as_str(), count))
            })
            .collect()
    }

    /// Times `elapsed` against `stage`.
    pub fn stage(&self, stage: &'static str, elapsed: Duration) {
        self.stage_seconds
            .get_or_create(&StageLabel { stage })
            .observe(elapsed.as_secs_f64());
    }

    /// A copy of the counters, for the stop log and `weir::run`'s report.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.get(),
            executed: self.executed.get(),
            deduplicated: self.deduplicated.get(),
            dead_lettered: self
                .dead_letters_by_kind()
                .iter()
                .map(|(_, count)| count)
                .sum(),
            published: self.published.get(),
            acked: self.acked.get(),
        }
    }
}

/// A copy of a pipeline's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: u64,
    pub executed: u64,
    pub deduplicated: u64,
    pub dead_lettered: u64,
    pub published: u64,
    pub acked: u64,
}
