//! `weir plugin new|build`: make a plugin crate, and build one into a component.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target plugins are built for by default, as on a plugin author's machine.
pub const DEFAULT_TARGET: &str = "wasm32-wasip2";

/// The targets `weir plugin build` knows how to make a component for.
pub const TARGETS: [&str; 2] = ["wasm32-wasip2", "wasm32-unknown-unknown"];

/// The guest SDK of the source tree this weir was built from.
const BUILT_WITH_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../guest-sdk");

/// Makes a plugin crate `name` in `parent`: a stateless greeter, or with `stateful`, running
/// totals per state key (contract 0.2.0's state).
pub fn new(
    name: &str,
    parent: &Path,
    sdk: Option<PathBuf>,
    stateful: bool,
) -> Result<(), crate::Error> {
    let usage = crate::Error::Usage;
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|first| first.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid_name {
        return Err(usage(format!(
            "{name:?} cannot name a plugin crate: use lowercase letters, digits, '-' and '_', starting with a letter"
        )));
    }
    let sdk = sdk.unwrap_or_else(|| PathBuf::from(BUILT_WITH_SDK));
    let sdk = sdk.canonicalize().ok().filter(|sdk| sdk.join("Cargo.toml").is_file()).ok_or_else(|| {
        usage(format!(
            "the weir guest SDK is not at {}: pass --sdk with the path of guest-sdk/ in a weir checkout",
            sdk.display()
        ))
    })?;
    let dir = parent.join(name);
    if dir.exists() {
        return Err(usage(format!(
            "{} already exists: choose another name or --dir",
            dir.display()
        )));
    }
    let lib_name = name.replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("@NAME@", name)
            .replace("@SDK@", &sdk.display().to_string())
            .replace(
                "@COMPONENT@",
                &format!("target/{DEFAULT_TARGET}/release/{lib_name}.wasm"),
            )
    };
    let (lib, fixtures) = if stateful {
        (
            include_str!("template/stateful/lib.rs.in"),
            [
                (
                    "fixtures/first-entry.json",
                    include_str!("template/stateful/first-entry.json"),
                ),
                (
                    "fixtures/entries-of-a-key.json",
                    include_str!("template/stateful/entries-of-a-key.json"),
                ),
            ],
        )
    } else {
        (
            include_str!("template/lib.rs.in"),
            [
                ("fixtures/greets.json", include_str!("template/greets.json")),
                (
                    "fixtures/not-json.json",
                    include_str!("template/not-json.json"),
                ),
            ],
        )
    };
    let files = [
        ("Cargo.toml", fill(include_str!("template/Cargo.toml.in"))),
        ("src/lib.rs", fill(lib)),
        ("README.md", fill(include_str!("template/README.md.in"))),
        (".gitignore", include_str!("template/gitignore").to_owned()),
    ]
    .into_iter()
    .chain(fixtures.map(|(file, text)| (file, text.to_owned())));
    for (file, text) in files {
        let path = dir.join(file);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, text));
        written.map_err(|e| usage(format!("cannot write {}: {e}", path.display())))?;
    }
    println!(
        "created {} (the weir guest SDK at {})",
        dir.display(),
        sdk.display()
    );
    println!("next:");
    println!("    cd {}", dir.display());
    println!("    cargo test                      # the transform's logic, natively");
    println!("    weir plugin build               # the component");
    println!(
        "    weir plugin test target/{DEFAULT_TARGET}/release/{lib_name}.wasm --fixtures fixtures"
    );
    Ok(())
}

pub fn build(path: &Path, target: &str) -> Result<(), crate::Error> {
    let usage = crate::Error::Usage;
    let manifest = path.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(usage(format!(
            "{} is not a crate (no Cargo.toml): pass the plugin crate's directory",
            path.display()
        )));
    }
    let (lib_name, target_dir) = library_and_target_dir(&manifest)?;
    let mut cargo_build = cargo();
    cargo_build.args(["build", "--release", "--target", target, "--manifest-path"]);
    cargo_build.arg(&manifest);
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if target == "wasm32-unknown-unknown" {
        // This target links a core module; the toolchain's component linker makes it a
        // component (wasm32-wasip2 uses that linker already).
        flags += " -Clinker=wasm-component-ld";
    }
    if !target_installed(target) {
        let sysroot = std::env::var_os("WEIR_WASM_SYSROOT")
            .map(PathBuf::from)
            .filter(|sysroot| sysroot.join("lib/rustlib").join(target).is_dir())
            .ok_or_else(|| {
                usage(format!(
                    "the {target} Rust target is not installed: run `rustup target add {target}`, or set WEIR_WASM_SYSROOT to a no_std sysroot for it (weir's scripts/prerequisites.sh builds one)"
                ))
            })?;
        flags += &format!(" --sysroot {}", sysroot.display());
        println!("building with the sysroot {}", sysroot.display());
    }
    cargo_build.env("RUSTFLAGS", flags.trim());
    let status = cargo_build
        .status()
        .map_err(|e| usage(format!("cannot run cargo: {e}: is Rust installed?")))?;
    if !status.success() {
        return Err(usage(format!(
            "cargo could not build {} for {target} (its errors are above)",
            path.display()
        )));
    }
    let component = target_dir
        .join(target)
        .join("release")
        .join(format!("{lib_name}.wasm"));
    println!("component: {}", component.display());
    super::plugin::inspect(component)
}

/// The crate's cdylib name and its target directory, from `cargo metadata`.
fn library_and_target_dir(manifest: &Path) -> Result<(String, PathBuf), crate::Error> {
    let usage = crate::Error::Usage;
    let output = cargo()
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(manifest)
        .output()
        .map_err(|e| usage(format!("cannot run cargo: {e}: is Rust installed?")))?;
    if !output.status.success() {
        return Err(usage(format!(
            "cargo cannot read {}: {}",
            manifest.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| usage(format!("cargo metadata gave unexpected output: {e}")))?;
    let manifest = manifest.canonicalize().unwrap_or(manifest.to_owned());
    let library = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|package| {
            package["manifest_path"]
                .as_str()
                .is_some_and(|path| Path::new(path) == manifest)
        })
        .flat_map(|package| package["targets"].as_array().into_iter().flatten())
        .find(|target| {
            target["crate_types"]
                .as_array()
                .is_some_and(|types| types.iter().any(|t| t == "cdylib"))
        })
        .and_then(|target| target["name"].as_str())
        .map(|name| name.replace('-', "_"))
        .ok_or_else(|| {
            usage(format!(
                "{} has no cdylib library: add `[lib] crate-type = [\"cdylib\", \"rlib\"]`",
                manifest.display()
            ))
        })?;
    let target_dir = metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| usage("cargo metadata did not name a target directory".to_owned()))?;
    Ok((library, target_dir))
}

/// The cargo that runs this weir (when run by cargo), else the one on PATH.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
}

/// Whether the active Rust toolchain has the standard library for `target`.
fn target_installed(target: &str) -> bool {
    Command::new("rustc")
        .args(["--print", "target-libdir", "--target", target])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .is_some_and(|libdir| libdir.is_dir())
}
