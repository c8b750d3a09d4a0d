//! Compiled components on disk, so that a restart does not compile a plugin again (a Python
//! component takes seconds). An entry is named by the sha256 of the component file and a
//! hash of the engine's settings; anything wrong with the cache (a directory others may
//! write to, an unreadable or stale entry, a full disk) falls back to compiling. It holds at
//! most `sandbox.compile_cache_bytes`: the entries used longest ago go first, and an entry
//! of a component weir refused goes at once.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// The compiled component with this `sha256` from `dir`, if the cache has a usable one.
pub fn load(engine: &Engine, dir: &Path, sha256: &str) -> Option<Component> {
    let entry = entry_path(engine, dir, sha256);
    if !entry.is_file() {
        return None;
    }
    if let Err(reason) = private(dir) {
        tracing::warn!(dir = %dir.display(), %reason, "not using the compile cache");
        return None;
    }
    // SAFETY: deserializing runs the native code in the file as it is. weir writes entries
    // only from its own compilations, into a directory only this user may write to (checked
    // just above), under a name bound to the component's content and the engine's
    // settings; wasmtime checks the version and settings it was made with.
    match unsafe { Component::deserialize_file(engine, &entry) } {
        Ok(component) => {
            // Marks the entry used, for the eviction of the least recently used.
            let _ = std::fs::File::options()
                .append(true)
                .open(&entry)
                .and_then(|file| file.set_modified(std::time::SystemTime::now()));
            Some(component)
        }
        Err(error) => {
            tracing::warn!(
                entry = %entry.display(),
                error = %format!("{error:#}"),
                "unusable compile cache entry; compiling again"
            );
            None
        }
    }
}

/// Keeps a compiled component (`serialized`) in `dir`, then removes the entries used
/// longest ago until the cache holds at most `max_bytes`. Failing, it only warns: the
/// cache saves time, nothing depends on it.
pub fn store(dir: &Path, engine: &Engine, sha256: &str, serialized: &[u8], max_bytes: u64) {
    if serialized.len() as u64 > max_bytes {
        return;
    }
    let entry = entry_path(engine, dir, sha256);
    if let Err(error) = write(dir, &entry, serialized) {
        tracing::warn!(dir = %dir.display(), %error, "cannot cache the compiled plugin");
        return;
    }
    if let Err(error) = evict(dir, &entry, max_bytes) {
        tracing::warn!(dir = %dir.display(), %error, "cannot trim the compile cache");
    }
}

/// Removes the entries used longest ago, never `keep`, until the entries total `max_bytes`.
fn evict(dir: &Path, keep: &Path, max_bytes: u64) -> std::io::Result<()> {
    let mut entries = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let path = item.path();
        if path
            .extension()
            .is_some_and(|extension| extension == "cwasm")
        {
            let metadata = item.metadata()?;
            entries.push((metadata.modified()?, metadata.len(), path));
        }
    }
    let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
    entries.sort();
    for (_, size, path) in entries {
        if total <= max_bytes {
            break;
        }
        if path != keep {
            std::fs::remove_file(&path)?;
            total -= size;
        }
    }
    Ok(())
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
fn write(dir: &Path, entry: &Path, serialized: &[u8]) -> std::io::Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    private(dir).map_err(std::io::Error::other)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn age(path: &Path, seconds: u64) {
        std::fs::File::options()
            .append(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(seconds))
            .unwrap();
    }

    /// The cache keeps at most its bound, dropping the entries used longest ago: a load
    /// counts as a use.
    #[test]
    fn the_cache_holds_its_bound_and_drops_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().join("compiled");
        let engine = Engine::default();
        let orders = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/dist/orders.wasm"),
        )
        .expect("scripts/build-plugins.sh built plugins/dist/orders.wasm");
        let compiled = engine.precompile_component(&orders).unwrap();
        let size = compiled.len() as u64;
        let bound = 2 * size + size / 2;
        store(&dir, &engine, "used", &compiled, bound);
        store(&dir, &engine, "unused", &compiled, bound);
        // "used" was written first, then loaded most recently.
        age(&entry_path(&engine, &dir, "used"), 200);
        age(&entry_path(&engine, &dir, "unused"), 100);
        assert!(load(&engine, &dir, "used").is_some());
        store(&dir, &engine, "new", &compiled, bound);
        let exists = |sha: &str| entry_path(&engine, &dir, sha).exists();
        assert!(exists("used") && exists("new"));
        assert!(!exists("unused"), "the entry used longest ago is dropped");
        // One entry larger than the whole cache is not kept at all.
        store(&dir, &engine, "huge", &compiled, size - 1);
        assert!(!exists("huge"));
    }
}
