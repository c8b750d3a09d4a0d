//! Compiled components on disk, so that a restart does not compile a plugin again (a Python
//! component takes seconds). An entry is named by the sha256 of the component file and a
//! hash of the engine's settings; anything wrong with the cache (a directory others may
//! write to, an unreadable or stale entry, a full disk) falls back to compiling.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Loads the compiled form of the component with this `sha256` from `dir`, or compiles
/// `bytes` and stores the result there.
pub fn load_or_compile(
    engine: &Engine,
    dir: &Path,
    sha256: &str,
    bytes: &[u8],
) -> wasmtime::Result<Component> {
    let entry = entry_path(engine, dir, sha256);
    if entry.is_file() {
        if let Err(reason) = private(dir) {
            tracing::warn!(dir = %dir.display(), %reason, "not using the compile cache");
            return Component::new(engine, bytes);
        }
        // SAFETY: deserializing runs the native code in the file as it is. weir writes
        // entries only from its own compilations, into a directory only this user may write
        // to (checked just above), under a name bound to the component's content and the
        // engine's settings; wasmtime checks the version and settings it was made with.
        match unsafe { Component::deserialize_file(engine, &entry) } {
            Ok(component) => return Ok(component),
            Err(error) => tracing::warn!(
                entry = %entry.display(),
                error = %format!("{error:#}"),
                "unusable compile cache entry; compiling again"
            ),
        }
    }
    let component = Component::new(engine, bytes)?;
    if let Err(error) = store(dir, &entry, &component) {
        tracing::warn!(dir = %dir.display(), error = %format!("{error:#}"), "cannot cache the compiled plugin");
    }
    Ok(component)
}

/// Removes the entry of the component with this `sha256`, if there is one: a component weir
/// refused must not stay compiled on disk.
pub fn forget(engine: &Engine, dir: &Path, sha256: &str) {
    let entry = entry_path(engine, dir, sha256);
    match std::fs::remove_file(&entry) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(entry = %entry.display(), %error, "cannot remove a refused plugin from the compile cache")
        }
    }
}

fn entry_path(engine: &Engine, dir: &Path, sha256: &str) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()))
}

/// Writes an entry atomically (a reader never sees half a file), creating the directory
/// private to this user.
fn store(dir: &Path, entry: &Path, component: &Component) -> wasmtime::Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    private(dir).map_err(wasmtime::Error::msg)?;
    let serialized = component.serialize()?;
    let partial = entry.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&partial, serialized)?;
    std::fs::rename(&partial, entry)?;
    Ok(())
}

/// Whether only this user may write to `dir`.
fn private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if metadata.uid() != me || metadata.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is not private to this user: make it `chmod 700` and owned by the user running weir",
            dir.display()
        ));
    }
    Ok(())
}
