//! `weir plugin inspect|test`: what a component is, and its golden fixtures and fuzzing
//! (`new` and `build` are `scaffold.rs`'s, `deploy` is `deploy.rs`'s, `diff` is `diff.rs`'s).

use std::path::PathBuf;

use crate::config::{LimitsConfig, SandboxConfig};
use crate::diff::DiffRange;
use weir_sandbox::Sandbox;
use weir_sandbox::harness;

use super::PluginCommand;

pub fn run(command: PluginCommand) -> Result<(), crate::Error> {
    match command {
        PluginCommand::Inspect { file } => inspect(file),
        PluginCommand::Test {
            file,
            fixtures,
            update,
            fuzz,
            seed,
            limits,
        } => test(
            file,
            fixtures,
            update,
            fuzz.map(|count| (count, seed)),
            limits.into_limits(),
        ),
        PluginCommand::New {
            name,
            dir,
            sdk,
            stateful,
        } => super::scaffold::new(&name, &dir, sdk, stateful),
        PluginCommand::Build { path, target } => super::scaffold::build(&path, &target),
        PluginCommand::Deploy { target, file } => {
            super::block_on(super::deploy::deploy(target, file))
        }
        PluginCommand::Diff {
            target,
            file,
            last,
            from_seq,
            to_seq,
            show,
        } => {
            let range = match (from_seq, to_seq) {
                (Some(first), Some(last)) if first > last => {
                    return Err(crate::Error::Usage(format!(
                        "--from-seq {first} is past --to-seq {last}"
                    )));
                }
                (Some(first), Some(last)) => DiffRange::Sequences(first, last),
                _ => DiffRange::Last(last.unwrap_or(100).max(1)),
            };
            super::block_on(super::diff::diff(target, file, range, show))
        }
    }
}

fn sandbox(limits: &LimitsConfig) -> Result<Sandbox, crate::Error> {
    Sandbox::new(
        &SandboxConfig::default(),
        limits.memory_bytes,
        crate::own_compiler()?,
    )
    .map_err(|e| crate::Error::Engine(format!("{e:#}")))
}

pub fn inspect(file: PathBuf) -> Result<(), crate::Error> {
    let limits = LimitsConfig::default();
    let inspection = sandbox(&limits)?
        .inspect(&file, &limits)
        .map_err(|e| crate::Error::Usage(e.to_string()))?;
    println!("file:     {}", file.display());
    println!("size:     {} bytes", inspection.size);
    println!("sha256:   {}", inspection.sha256);
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    println!("imports:  {}", list(&inspection.imports));
    println!("exports:  {}", list(&inspection.exports));
    println!(
        "contract: weir runs {}",
        weir_sandbox::CONTRACT_EXPORTS.join(" or ")
    );
    match inspection.verdict {
        Ok(()) => {
            println!("runnable: yes");
            Ok(())
        }
        Err(error) => {
            println!("runnable: no: {error}");
            Err(crate::Error::Usage(format!(
                "{} cannot run in weir",
                file.display()
            )))
        }
    }
}

fn test(
    file: PathBuf,
    fixtures: PathBuf,
    update: bool,
    fuzz: Option<(usize, u64)>,
    limits: LimitsConfig,
) -> Result<(), crate::Error> {
    let plugin = sandbox(&limits)?
        .load(&file, &limits)
        .map_err(|e| crate::Error::Usage(e.to_string()))?;
    let report = harness::run_fixtures(&plugin, &fixtures, update).map_err(crate::Error::Usage)?;
    print!("{}", report.render());
    if report.failed() > 0 {
        return Err(crate::Error::Usage(format!(
            "{} of {} fixtures failed",
            report.failed(),
            report.cases.len()
        )));
    }
    let Some((count, seed)) = fuzz else {
        return Ok(());
    };
    let fixtures: Vec<_> = report
        .cases
        .into_iter()
        .map(|(fixture, _)| fixture)
        .collect();
    let findings = harness::fuzz(&plugin, &fixtures, count, seed);
    println!(
        "fuzz: {count} generated inputs (--seed {seed}), {} misbehaved",
        findings.len()
    );
    const SHOWN: usize = 5;
    for finding in findings.iter().take(SHOWN) {
        println!("    {}: {}", finding.kind.as_str(), finding.reason);
        println!("    as a fixture:");
        for line in finding.as_fixture().lines() {
            println!("      {line}");
        }
    }
    if findings.len() > SHOWN {
        println!("    … and {} more", findings.len() - SHOWN);
    }
    if !findings.is_empty() {
        return Err(crate::Error::Usage(format!(
            "{} of {count} generated inputs made the plugin trap or exhaust a limit",
            findings.len()
        )));
    }
    Ok(())
}
