//! What weir agrees to compile, and compiling it where a compile bomb can be stopped.
//!
//! cranelift cannot be interrupted, and components of a few hundred kilobytes can take it
//! minutes and gigabytes (deeply nested blocks, 500 000 functions, one huge function body).
//! So a component is measured before it is compiled (its size, how many functions it has,
//! its largest function body), and compiled in a child process held to a memory limit and
//! killed at a deadline. The child hands back the compiled form serialized, which is loaded
//! like a compile-cache entry: one path for both.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use wasmparser::{Parser, Payload};

use crate::SandboxConfig;

/// Where components are compiled.
#[derive(Debug, Clone)]
pub enum Compiler {
    /// In a child process, held to `sandbox.compile_timeout_ms` and
    /// `sandbox.compile_memory_bytes`: `program` run with `args`, followed by the sandbox's
    /// own arguments, which it must hand to [`child_main`] (the `weir` binary's hidden
    /// `compile-component` command).
    ChildProcess {
        program: PathBuf,
        args: Vec<OsString>,
    },
    /// In this process, with no deadline or memory limit: only for components the caller
    /// trusts (tests and benchmarks of weir's own plugins, a plugin author's own tests).
    InThisProcess,
}

/// Why a component was not compiled.
#[derive(Debug)]
pub enum Refusal {
    /// More than weir agrees to compile, measured before compiling: what, and the setting.
    TooCostly(String),
    /// Not a component wasmtime can compile, in its words.
    Invalid(String),
    /// The child process could not run or died of something other than a limit.
    Compiler(String),
}

/// What weir measures of a component before compiling it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub bytes: usize,
    /// Functions defined in all its core modules together.
    pub functions: usize,
    pub largest_function_bytes: usize,
}

impl Shape {
    /// Measures a component (or a core module) without compiling it.
    pub fn of(bytes: &[u8]) -> Result<Shape, Refusal> {
        let mut shape = Shape {
            bytes: bytes.len(),
            ..Shape::default()
        };
        // `parse_all` descends into the component's nested core modules and components.
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.map_err(|e| Refusal::Invalid(e.to_string()))? {
                Payload::CodeSectionStart { count, .. } => shape.functions += count as usize,
                Payload::CodeSectionEntry(body) => {
                    shape.largest_function_bytes =
                        shape.largest_function_bytes.max(body.range().len())
                }
                _ => {}
            }
        }
        Ok(shape)
    }
}

/// Checks what weir can measure of a component before compiling it against `settings`.
pub fn measure(bytes: &[u8], settings: &SandboxConfig) -> Result<(), Refusal> {
    // The size first: a component too large is not even parsed.
    if bytes.len() > settings.max_component_bytes {
        return Err(Refusal::TooCostly(format!(
            "it is {} bytes, more than sandbox.max_component_bytes = {}",
            bytes.len(),
            settings.max_component_bytes
        )));
    }
    let shape = Shape::of(bytes)?;
    if shape.functions > settings.max_functions {
        return Err(Refusal::TooCostly(format!(
            "it has {} functions, more than sandbox.max_functions = {}",
            shape.functions, settings.max_functions
        )));
    }
    if shape.largest_function_bytes > settings.max_function_bytes {
        return Err(Refusal::TooCostly(format!(
            "its largest function body is {} bytes, more than sandbox.max_function_bytes = {}",
            shape.largest_function_bytes, settings.max_function_bytes
        )));
    }
    Ok(())
}

/// Compiles a component in a child process, returning its serialized compiled form.
pub fn in_child(
    program: &PathBuf,
    args: &[OsString],
    settings: &SandboxConfig,
    bytes: &[u8],
) -> Result<Vec<u8>, Refusal> {
    let mut child = Command::new(program)
        .args(args)
        .arg(settings.max_stack_bytes.to_string())
        .arg(settings.compile_memory_bytes.to_string())
        .arg(std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Refusal::Compiler(format!(
                "cannot start the compiler process {}: {e}",
                program.display()
            ))
        })?;
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let component = bytes.to_vec();
    // The child reads the whole component before it compiles; a child killed meanwhile
    // makes this write fail, which the exit status reports better.
    std::thread::spawn(move || {
        let _ = stdin.write_all(&component);
    });
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let deadline = Duration::from_millis(settings.compile_timeout_ms);
    let (output, timed_out) = match finished.recv_timeout(deadline) {
        Ok(output) => (output, false),
        Err(_) => {
            // SAFETY: kill has no memory effects; `pid` is still this process's child,
            // because only the waiting thread reaps it, and it has not yet returned.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let output = finished
                .recv()
                .map_err(|_| Refusal::Compiler("the compiler process was lost".into()))?;
            (output, true)
        }
    };
    let output = output.map_err(|e| Refusal::Compiler(format!("the compiler process: {e}")))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if timed_out {
        return Err(Refusal::TooCostly(format!(
            "compiling it took longer than sandbox.compile_timeout_ms = {}",
            settings.compile_timeout_ms
        )));
    }
    if output.status.success() {
        return Ok(output.stdout);
    }
    if output.status.signal() == Some(libc::SIGABRT) && stderr.contains("memory allocation") {
        return Err(Refusal::TooCostly(format!(
            "compiling it needed more than sandbox.compile_memory_bytes = {} bytes of memory",
            settings.compile_memory_bytes
        )));
    }
    match output.status.code() {
        Some(REFUSED) => Err(Refusal::Invalid(stderr.trim().to_owned())),
        _ => Err(Refusal::Compiler(format!(
            "the compiler process failed ({}): {}",
            output.status,
            stderr.trim()
        ))),
    }
}

/// The child's exit code when wasmtime refuses the component (its reason on stderr).
const REFUSED: i32 = 3;

/// The child process's side of [`Compiler::ChildProcess`]. Its arguments: the sandbox's
/// `max_stack_bytes`, the memory limit in bytes, and the parent's pid. It dies with its
/// parent, limits its own memory, reads a component on stdin, compiles it for an engine
/// with the sandbox's settings and writes the compiled form to stdout.
pub fn child_main(args: &[OsString]) -> ExitCode {
    let numbers: Vec<u64> = args
        .iter()
        .filter_map(|arg| arg.to_str()?.parse().ok())
        .collect();
    let [max_stack_bytes, memory_bytes, parent] = numbers[..] else {
        eprintln!(
            "weir compile-component: weir runs this itself, with the stack size, memory limit and parent pid"
        );
        return ExitCode::from(2);
    };
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid only set and read this process's state.
    // A compile bomb must not outlive the weir that started it (checked after setting the
    // signal, in case the parent died just before).
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() as u64 != parent {
            return ExitCode::from(2);
        }
    }
    // RLIMIT_DATA counts the writable memory the process maps (heap and anonymous maps):
    // past it, an allocation fails and the process aborts, which the parent reports.
    let limit = libc::rlimit {
        rlim_cur: memory_bytes as libc::rlim_t,
        rlim_max: memory_bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct passed to it.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } != 0 {
        eprintln!(
            "cannot limit the compiler's memory: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::from(1);
    }
    let mut component = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut component) {
        eprintln!("cannot read the component: {error}");
        return ExitCode::from(1);
    }
    let settings = SandboxConfig {
        max_stack_bytes: max_stack_bytes as usize,
        ..SandboxConfig::default()
    };
    let engine = match wasmtime::Engine::new(&crate::engine_config(&settings)) {
        Ok(engine) => engine,
        Err(error) => {
            eprintln!("cannot create the wasm engine: {error:#}");
            return ExitCode::from(1);
        }
    };
    match engine.precompile_component(&component) {
        Ok(compiled) => match std::io::stdout().lock().write_all(&compiled) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("cannot write the compiled component: {error}");
                ExitCode::from(1)
            }
        },
        Err(error) => {
            eprintln!("{error:#}");
            ExitCode::from(REFUSED as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../plugins/dist")
            .join(format!("{name}.wasm"));
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/build-plugins.sh builds it)",
                path.display()
            )
        })
    }

    /// The defaults admit weir's own plugins with room to spare, the Python one included.
    #[test]
    fn the_default_limits_admit_weirs_own_plugins() {
        let settings = SandboxConfig::default();
        for name in ["orders", "hostile", "stamp-py"] {
            let bytes = plugin(name);
            let shape = Shape::of(&bytes).unwrap();
            println!("{name}: {shape:?}");
            assert!(measure(&bytes, &settings).is_ok(), "{name}: {shape:?}");
            assert!(
                shape.bytes * 2 < settings.max_component_bytes,
                "{name}: {shape:?}"
            );
            assert!(
                shape.functions * 2 < settings.max_functions,
                "{name}: {shape:?}"
            );
            assert!(
                shape.largest_function_bytes * 2 < settings.max_function_bytes,
                "{name}: {shape:?}"
            );
        }
    }
}
