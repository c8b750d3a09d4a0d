//! `weir plugin deploy`: puts a new plugin in a pipeline's plugin file and has the running
//! `weir run` swap it in, without stopping it.
//!
//! The candidate is checked here first, as weir checks a plugin at start; then it replaces
//! the plugin file in one rename (the file it replaces kept beside it as `.previous`), so
//! that a restart runs it too; then the running weir is asked, on its admin port, to reload
//! that one pipeline. If the running weir refuses it, the files are put back as they were,
//! so that what runs and what a restart would run stay the same.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weir_admin::{ReloadOutcome, ReloadReport};

use super::PipelineArgs;
use super::diff::short;
use crate::config::ValidPipeline;

/// How long the running weir may take to load and check the new plugin: past the
/// sandbox's compile deadline, which holds it.
fn patience(config: &crate::ValidConfig) -> Duration {
    Duration::from_millis(config.sandbox().compile_timeout_ms) + Duration::from_secs(30)
}

pub async fn deploy(target: PipelineArgs, candidate: PathBuf) -> Result<(), crate::Error> {
    let (config, pipeline) = target.load_valid()?;
    let name = pipeline.config().name.clone();
    let plugin_file = pipeline.config().plugin.clone();
    refuse_shared_file(&config, &pipeline)?;
    let bytes = std::fs::read(&candidate)
        .map_err(|e| crate::Error::Usage(format!("cannot read {}: {e}", candidate.display())))?;
    check(&config, &pipeline, &candidate).await?;
    let installed = read_if_present(&plugin_file)?;
    let previous = previous_path(&plugin_file);
    // What `.previous` held, put back if the running weir refuses (it may be the candidate:
    // a rollback).
    let kept_before = read_if_present(&previous)?;
    match installed.as_deref() == Some(bytes.as_slice()) {
        true => println!(
            "{} already holds this plugin; asking the running weir to reload it",
            plugin_file.display()
        ),
        false => {
            install(
                &plugin_file,
                installed.is_some().then_some(&previous),
                &bytes,
            )?;
            println!(
                "installed as {}{}",
                plugin_file.display(),
                match installed {
                    Some(_) => format!(" (the file it replaces is kept as {})", previous.display()),
                    None => String::new(),
                }
            );
        }
    }
    let Some(admin) = config.admin().address() else {
        println!(
            "the admin port is off in {} ([admin] listen = \"\"): send SIGHUP to the running weir to swap it in",
            target.config.display()
        );
        return Ok(());
    };
    let path = format!("/reload?pipeline={name}");
    let (code, body) = match weir_admin::post(admin, &path, patience(&config)).await {
        Ok(answer) => answer,
        Err(error @ weir_admin::AdminError::NoAnswer { .. }) => {
            return Err(crate::Error::Engine(format!(
                "{error}: its reload may still be under way, and the new plugin file stays installed; `weir status` shows the plugin each pipeline runs"
            )));
        }
        Err(error) => {
            println!(
                "no running weir answered ({error}): a weir started from {} runs the new plugin",
                target.config.display()
            );
            return Ok(());
        }
    };
    let report: ReloadReport = serde_json::from_str(&body).map_err(|e| {
        crate::Error::Usage(format!(
            "{admin} answered {code} with what is not a reload report ({e}): is it weir's admin port? The new plugin file stays installed"
        ))
    })?;
    if let Some(restart) = &report.restart_needed {
        println!("note: {restart}");
    }
    let outcome = report
        .pipelines
        .iter()
        .find(|reloaded| reloaded.pipeline == name)
        .map(|reloaded| &reloaded.outcome);
    let refusal = match (&report.error, outcome) {
        (Some(error), _) => error.clone(),
        (None, Some(ReloadOutcome::Refused { reason })) => reason.clone(),
        (None, Some(ReloadOutcome::Swapped { from, to })) => {
            println!(
                "pipeline {name}: swapped plugin {} for {}; each partition runs it from its next batch",
                short(from),
                short(to)
            );
            return Ok(());
        }
        (None, Some(ReloadOutcome::Unchanged { sha256 })) => {
            println!("pipeline {name}: already runs plugin {}", short(sha256));
            return Ok(());
        }
        (None, Some(ReloadOutcome::Starting)) => {
            println!("pipeline {name}: still starting; it runs the new plugin once started");
            return Ok(());
        }
        (None, None) => format!("{admin} did not say what became of pipeline {name}"),
    };
    let restored = match installed {
        Some(installed) if installed == bytes => {
            format!("{} stays as it is", plugin_file.display())
        }
        installed => {
            put_back(&plugin_file, installed.as_deref())?;
            put_back(&previous, kept_before.as_deref())?;
            format!("{} is as it was", plugin_file.display())
        }
    };
    Err(crate::Error::Usage(format!(
        "the running weir refused the new plugin: {refusal}. It keeps serving the old one, and {restored}"
    )))
}

/// Refuses a plugin file that other pipelines of the configuration use too: deploying to
/// one would change theirs at their next restart.
fn refuse_shared_file(
    config: &crate::ValidConfig,
    pipeline: &ValidPipeline,
) -> Result<(), crate::Error> {
    let file = pipeline.config().plugin.as_path();
    let same = |other: &Path| {
        other == file
            || matches!(
                (std::fs::canonicalize(other), std::fs::canonicalize(file)),
                (Ok(a), Ok(b)) if a == b
            )
    };
    let sharing: Vec<&str> = config
        .pipelines()
        .iter()
        .filter(|other| other.config().name != pipeline.config().name)
        .filter(|other| same(&other.config().plugin))
        .map(|other| other.config().name.as_str())
        .collect();
    match sharing.is_empty() {
        true => Ok(()),
        false => Err(crate::Error::Usage(format!(
            "pipeline {:?} shares its plugin file {} with {}: give it a file of its own, or put the new plugin there and send weir SIGHUP to reload them all",
            pipeline.config().name,
            file.display(),
            sharing.join(", ")
        ))),
    }
}

/// Loads and checks `candidate` as weir would before running it for `pipeline`.
async fn check(
    config: &crate::ValidConfig,
    pipeline: &ValidPipeline,
    candidate: &Path,
) -> Result<(), crate::Error> {
    let plugin = crate::load_candidate(config, pipeline, candidate)
        .await
        .map_err(|error| match error {
            crate::Error::Start { source, .. } => crate::Error::Usage(format!(
                "{} cannot run as pipeline {:?}'s plugin: {source}. Nothing was changed",
                candidate.display(),
                pipeline.config().name
            )),
            other => other,
        })?;
    println!(
        "checked {}: sha256 {}, {}",
        candidate.display(),
        plugin.sha256(),
        plugin.contract()
    );
    Ok(())
}

/// Replaces `file` with `bytes` in one rename, keeping what it held as `keep` first.
fn install(file: &Path, keep: Option<&PathBuf>, bytes: &[u8]) -> Result<(), crate::Error> {
    let failed = |what: &str, path: &Path, e: std::io::Error| {
        crate::Error::Usage(format!("cannot {what} {}: {e}", path.display()))
    };
    if let Some(keep) = keep {
        std::fs::copy(file, keep).map_err(|e| failed("keep the old plugin as", keep, e))?;
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    let staged = dir.join(format!(
        ".{}.deploying",
        file.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut out = std::fs::File::create(&staged)
        .map_err(|e| failed("write the new plugin to", &staged, e))?;
    out.write_all(bytes)
        .and_then(|()| out.sync_all())
        .map_err(|e| failed("write the new plugin to", &staged, e))?;
    std::fs::rename(&staged, file).map_err(|e| failed("install the new plugin as", file, e))?;
    // The rename is durable once the directory is synced.
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The bytes of `file`, or `None` if there is no such file.
fn read_if_present(file: &Path) -> Result<Option<Vec<u8>>, crate::Error> {
    match std::fs::read(file) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::Error::Usage(format!(
            "cannot read {}: {e}",
            file.display()
        ))),
    }
}

/// Makes `file` hold `bytes` again, or not exist if it did not.
fn put_back(file: &Path, bytes: Option<&[u8]>) -> Result<(), crate::Error> {
    match bytes {
        Some(bytes) => install(file, None, bytes),
        None => match std::fs::remove_file(file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(crate::Error::Usage(format!(
                "cannot remove {} again: {e}",
                file.display()
            ))),
        },
    }
}

fn previous_path(file: &Path) -> PathBuf {
    let mut previous = file.as_os_str().to_owned();
    previous.push(".previous");
    PathBuf::from(previous)
}
