//! `weir check`: everything `weir run` would check before consuming, reported all at once,
//! without changing anything (no stream, consumer or store directory is created).

use std::path::Path;

use crate::config::{Config, ConfigError, PipelineConfig};
use weir_nats::Broker;
use weir_sandbox::Sandbox;
use weir_store::{Store, StoreError, StoreSettings};

/// One checked item: what was looked at, and what was found.
pub struct Finding {
    /// The pipeline it belongs to; `None` for the file as a whole.
    pub pipeline: Option<String>,
    /// What was checked: "config", "plugin", "store", "server", "input stream", ….
    pub item: &'static str,
    /// `Ok(detail)` when usable, `Err(problem)` with what to do otherwise.
    pub outcome: Result<String, String>,
}

/// Checks a configuration file. Fails only if the file cannot be read or parsed at all;
/// everything else becomes a finding.
pub async fn check(path: &Path) -> Result<Vec<Finding>, ConfigError> {
    let (config, problems) = Config::load_with_problems(path)?;
    let mut findings = Vec::new();
    if problems.is_empty() {
        findings.push(Finding {
            pipeline: None,
            item: "config",
            outcome: Ok(format!("{} pipelines", config.pipelines.len())),
        });
    }
    findings.extend(problems.into_iter().map(|problem| Finding {
        pipeline: None,
        item: "config",
        outcome: Err(problem),
    }));
    if let Some(address) = config.admin.address()
        && address.parse::<std::net::SocketAddr>().is_ok()
    {
        // Bound and let go at once: `weir run` would stop on an address it cannot take.
        findings.push(Finding {
            pipeline: None,
            item: "admin port",
            outcome: weir_admin::bind(address)
                .await
                .map(|_listener| format!("{address} is free"))
                .map_err(|error| error.to_string()),
        });
    }
    let sandbox = match crate::own_compiler().and_then(|compiler| {
        Sandbox::new(&config.sandbox, config.largest_memory_limit(), compiler)
            .map_err(|e| crate::Error::Engine(format!("{e:#}")))
    }) {
        Ok(sandbox) => Some(sandbox),
        Err(error) => {
            findings.push(Finding {
                pipeline: None,
                item: "engine",
                outcome: Err(format!("{error:#}")),
            });
            None
        }
    };
    for pipeline in &config.pipelines {
        check_pipeline(pipeline, sandbox.as_ref(), &mut findings).await;
    }
    Ok(findings)
}

async fn check_pipeline(
    pipeline: &PipelineConfig,
    sandbox: Option<&Sandbox>,
    findings: &mut Vec<Finding>,
) {
    let mut found = |item: &'static str, outcome: Result<String, String>| {
        findings.push(Finding {
            pipeline: Some(pipeline.name.clone()),
            item,
            outcome,
        })
    };
    if let Some(sandbox) = sandbox {
        found(
            "plugin",
            sandbox
                .load(&pipeline.plugin, &pipeline.limits)
                .map_err(|e| e.to_string())
                .and_then(|plugin| {
                    crate::StartError::unless_contract_fits(pipeline, &pipeline.plugin, &plugin)
                        .map_err(|unfit| unfit.to_string())?;
                    Ok(format!(
                        "{} (sha256 {}, {})",
                        pipeline.plugin.display(),
                        &plugin.sha256()[..12],
                        plugin.contract()
                    ))
                }),
        );
    }
    if let Some(store_dir) = &pipeline.store_dir {
        found("store", check_store(store_dir, pipeline.store_settings()));
    }

    let broker =
        match Broker::connect(&pipeline.nats, &format!("weir-check-{}", pipeline.name)).await {
            Ok(broker) => {
                found(
                    "server",
                    Ok(format!(
                        "{} at {}",
                        broker.server_description(),
                        pipeline.nats.url
                    )),
                );
                broker
            }
            Err(error) => {
                found("server", Err(error.to_string()));
                return;
            }
        };
    let input = &pipeline.input;
    let partitioning = pipeline.input_partitioning();
    // A partitioned pipeline's stream must put each input's partition in its subject.
    let stream = match broker
        .check_input_stream(input, partitioning.as_ref())
        .await
    {
        Ok(_) => broker.stream_len(&input.stream).await,
        Err(error) => Err(error),
    };
    let under_partitions = match partitioning {
        Some(_) => ", each under its partition",
        None => "",
    };
    found(
        "input stream",
        match stream {
            Ok(Some(messages)) => Ok(format!(
                "{:?} holds {messages} messages{under_partitions}",
                input.stream
            )),
            Ok(None) if input.create_stream => Ok(format!(
                "{:?} does not exist yet; weir will create it",
                input.stream
            )),
            Ok(None) => Err(format!(
                "input stream {:?} does not exist: create it (e.g. `nats stream add {} --subjects '{}'`) or set input.create_stream = true",
                input.stream, input.stream, input.subject
            )),
            Err(error) => Err(error.to_string()),
        },
    );
    let output = &pipeline.output;
    if pipeline.partitions.is_some() {
        found(
            "ledger",
            match broker
                .existing_ledger(output, &pipeline.marker_subjects())
                .await
            {
                Ok(Some(stream)) => Ok(format!(
                    "{stream:?} stores the outputs, dead letters and progress markers, and allows atomic publish"
                )),
                Ok(None) => match &output.stream {
                    Some(stream) => Ok(format!(
                        "nothing stores {:?} yet; weir will create stream {stream:?} for the outputs, dead letters and progress markers",
                        output.prefix
                    )),
                    None => Err(format!(
                        "no stream stores {:?}: set output.stream to have weir create one, or create one that also stores {:?} and {:?} with allow_atomic_publish",
                        output.prefix,
                        output.dlq_subject,
                        pipeline.marker_subjects()
                    )),
                },
                Err(error) => Err(error.to_string()),
            },
        );
    }
    let probe = format!("{}.probe", output.prefix);
    for (item, subject, shown, stream, key) in [
        (
            "output stream",
            probe.as_str(),
            format!("{}.>", output.prefix),
            &output.stream,
            "output.stream",
        ),
        (
            "dlq stream",
            output.dlq_subject.as_str(),
            output.dlq_subject.clone(),
            &output.dlq_stream,
            "output.dlq_stream",
        ),
    ] {
        // A partitioned pipeline's streams are the ledger, checked above.
        if pipeline.partitions.is_some() {
            break;
        }
        found(
            item,
            match (broker.stream_storing(subject).await, stream) {
                (Ok(Some(existing)), _) => Ok(format!("{existing:?} stores {shown:?}")),
                (Ok(None), Some(stream)) => Ok(format!(
                    "nothing stores {shown:?} yet; weir will create stream {stream:?}"
                )),
                (Ok(None), None) => Err(format!(
                    "no stream stores {shown:?}: set {key} to have weir create one, or create a stream for it"
                )),
                (Err(error), _) => Err(error.to_string()),
            },
        );
    }
    // One consumer per partition, when there are several.
    for partition in pipeline.partition_indexes() {
        let input = pipeline.partition_input(partition);
        found(
            "consumer",
            match broker.consumer_exists(&input).await {
                Ok(true) => Ok(format!("{:?} filters {:?}", input.consumer, input.subject)),
                Ok(false) => Ok(format!(
                    "{:?} does not exist yet; weir will create it",
                    input.consumer
                )),
                Err(error) => Err(error.to_string()),
            },
        );
    }
}

/// Whether this process may create entries in `dir`, as the kernel decides it for this user
/// (access(2): write and search permission, a read-only filesystem), rather than guessed from
/// the mode bits, which say nothing of whose the directory is.
fn may_create_in(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a NUL-terminated string that outlives the call, which only reads it.
    unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// An existing store must open (and not be locked by a running host); a missing one must
/// be creatable, which is checked on its nearest existing ancestor.
fn check_store(dir: &Path, settings: StoreSettings) -> Result<String, String> {
    let is_empty_dir = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
    if dir.exists() && !is_empty_dir && !dir.join("CURRENT").exists() {
        // Opening it would write a new database into someone else's directory.
        return Err(format!(
            "store_dir {} exists but is not a weir store: point store_dir at an empty or new directory",
            dir.display()
        ));
    }
    if dir.exists() && !is_empty_dir {
        return match Store::open(dir, settings) {
            Ok(_) => Ok(format!("{} opens", dir.display())),
            Err(StoreError::Locked { .. }) => Ok(format!(
                "{} is in use by a running weir (that host must stop before another can use it)",
                dir.display()
            )),
            Err(error) => Err(error.to_string()),
        };
    }
    let ancestor = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    if !ancestor.is_dir() {
        return Err(format!(
            "store_dir {} cannot be created: {} is a file, not a directory",
            dir.display(),
            ancestor.display()
        ));
    }
    if may_create_in(ancestor) {
        Ok(format!(
            "{} is new or empty; weir will create the store there",
            dir.display()
        ))
    } else {
        Err(format!(
            "store_dir {} cannot be created: {} is not writable by this user (or is on a read-only filesystem); set store_dir to a directory weir can create and write",
            dir.display(),
            ancestor.display()
        ))
    }
}
