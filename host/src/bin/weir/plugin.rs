//! `weir plugin …`: inspect a component, run its golden fixtures.

use std::path::PathBuf;

use weir::config::{LimitsConfig, SandboxConfig};
use weir::harness::{self, Verdict};
use weir::sandbox::Sandbox;

use crate::PluginCommand;

pub fn run(command: PluginCommand) -> Result<(), weir::Error> {
    match command {
        PluginCommand::Inspect { file } => inspect(file),
        PluginCommand::Test {
            file,
            fixtures,
            update,
            limits,
        } => test(file, fixtures, update, limits.into_limits()),
    }
}

fn sandbox(limits: &LimitsConfig) -> Result<Sandbox, weir::Error> {
    Sandbox::new(&SandboxConfig::default(), limits.memory_bytes)
        .map_err(|e| weir::Error::Engine(format!("{e:#}")))
}

fn inspect(file: PathBuf) -> Result<(), weir::Error> {
    let limits = LimitsConfig::default();
    let inspection = sandbox(&limits)?
        .inspect(&file, &limits)
        .map_err(|e| weir::Error::Usage(e.to_string()))?;
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
    println!("contract: weir expects {}", weir::sandbox::CONTRACT_EXPORT);
    match inspection.verdict {
        Ok(()) => {
            println!("runnable: yes");
            Ok(())
        }
        Err(error) => {
            println!("runnable: no: {error}");
            Err(weir::Error::Usage(format!(
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
    limits: LimitsConfig,
) -> Result<(), weir::Error> {
    let plugin = sandbox(&limits)?
        .load(&file, &limits)
        .map_err(|e| weir::Error::Usage(e.to_string()))?;
    let fixtures =
        harness::load_fixtures(&fixtures).map_err(|e| weir::Error::Usage(e.to_string()))?;
    let (mut passed, mut failed, mut updated) = (0, 0, 0);
    for fixture in &fixtures {
        let report = harness::run_case(&plugin, fixture, update).map_err(|e| {
            weir::Error::Usage(format!("cannot write {}: {e}", fixture.path.display()))
        })?;
        let status = match &report.verdict {
            Verdict::Pass => {
                passed += 1;
                "PASS"
            }
            Verdict::Updated => {
                updated += 1;
                "UPDATED"
            }
            Verdict::Fail(_) => {
                failed += 1;
                "FAIL"
            }
            Verdict::NotDeterministic { .. } => {
                failed += 1;
                "NONDETERMINISTIC"
            }
        };
        let usage = report.usage;
        println!(
            "{status:<16} {:<28} fuel {:>11}  memory {:>6.1} MiB  {:>8.2} ms{}",
            fixture.name,
            usage.fuel,
            usage.peak_memory_bytes as f64 / (1 << 20) as f64,
            usage.elapsed.as_secs_f64() * 1e3,
            if report.near_limits.is_empty() {
                String::new()
            } else {
                format!("  near {}", report.near_limits.join(", "))
            }
        );
        match &report.verdict {
            Verdict::Fail(diff) => {
                println!("    expected (-) vs actual (+):");
                for line in diff.lines() {
                    println!("    {line}");
                }
            }
            Verdict::NotDeterministic { diff, other_run } => {
                println!("    a fresh instance (-) vs {other_run} (+), same input:");
                for line in diff.lines() {
                    println!("    {line}");
                }
            }
            _ => {}
        }
    }
    println!("{passed} passed, {failed} failed, {updated} updated");
    if failed > 0 {
        return Err(weir::Error::Usage(format!(
            "{failed} of {} fixtures failed",
            fixtures.len()
        )));
    }
    Ok(())
}
