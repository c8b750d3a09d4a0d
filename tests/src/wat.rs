//! Hand-made hostile components, written in the component-model text format and assembled
//! by the `wat` crate: shapes no Rust toolchain emits (many core instances, many memories),
//! each exporting weir's real contract so that only what is under test can refuse them.

/// A component that exports `weir:transform/transformer@0.1.0`. Its `transform` runs
/// `body` (core wasm instructions, leaving nothing on the stack) and returns `ok([])`;
/// `extra` is spliced in at the component's top level (more core modules and instances).
pub fn transformer(body: &str, extra: &str) -> Vec<u8> {
    assemble(&transformer_text(body, extra))
}

/// The text of [`transformer`], for a test to change before it is assembled.
pub fn transformer_text(body: &str, extra: &str) -> String {
    format!(
        r#"(component
  (core module $main
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 1024))
    ;; cabi_realloc(old_ptr, old_size, align, new_size) -> ptr: a bump allocator.
    (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
      (local $ptr i32) (local $end i32)
      (local.set $ptr
        (i32.and
          (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get 2))))
      (local.set $end (i32.add (local.get $ptr) (local.get 3)))
      (block $done
        (loop $grow
          (br_if $done (i32.le_u (local.get $end) (i32.mul (memory.size) (i32.const 65536))))
          (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
          (br $grow)))
      (global.set $heap (local.get $end))
      (local.get $ptr))
    ;; message: subject, headers, payload (pointer and length each), stream-sequence,
    ;; data-time-unix-ns, dedup-key (pointer and length), seed -> the return area.
    (func (export "weir:transform/transformer@0.1.0#transform")
      (param i32 i32 i32 i32 i32 i32 i64 i64 i32 i32 i64) (result i32)
      {body}
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (i32.const 0))
      (i32.store (i32.const 24) (i32.const 0))
      (i32.const 16))
  )
  (type $pair (tuple string string))
  (type $headers (list $pair))
  (type $bytes (list u8))
  (type $message (record
    (field "subject" string) (field "headers" $headers) (field "payload" $bytes)
    (field "stream-sequence" u64) (field "data-time-unix-ns" u64)
    (field "dedup-key" string) (field "seed" u64)))
  (type $output (record
    (field "subject" string) (field "headers" $headers) (field "payload" $bytes)))
  (type $transform-error (variant
    (case "invalid-input" string) (case "plugin-failed" string)))
  (type $outputs (list $output))
  (type $transform-result (result $outputs (error $transform-error)))
  (type $transform-type (func (param "msg" $message) (result $transform-result)))
  (core instance $m (instantiate $main))
  (alias core export $m "memory" (core memory $mem))
  (alias core export $m "cabi_realloc" (core func $realloc))
  (alias core export $m "weir:transform/transformer@0.1.0#transform" (core func $transform-core))
  (func $transform (type $transform-type)
    (canon lift (core func $transform-core) (memory $mem) (realloc $realloc) string-encoding=utf8))
  {extra}
  (instance $transformer
    (export "message" (type $message)) (export "output" (type $output))
    (export "transform-error" (type $transform-error)) (export "transform" (func $transform)))
  (export "weir:transform/transformer@0.1.0" (instance $transformer))
)"#
    )
}

/// A component's text assembled into its binary.
pub fn assemble(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap_or_else(|e| panic!("the test component does not assemble: {e}"))
}

/// `count` more core instances, each owning a one-page memory of its own.
pub fn memory_hogs(count: usize) -> String {
    let mut extra = String::from("(core module $hog (memory 1))\n");
    for _ in 0..count {
        extra.push_str("  (core instance (instantiate $hog))\n");
    }
    extra
}

/// A `transform` body that never returns: it runs until its fuel is gone.
pub const SPIN: &str = "(loop $spin (br $spin))";

/// A component with `count` more (empty) functions in its core module.
pub fn many_functions(count: usize) -> Vec<u8> {
    let memory = r#"(memory (export "memory") 1)"#;
    let functions = "(func)".repeat(count);
    assemble(&transformer_text("", "").replacen(memory, &format!("{memory}{functions}"), 1))
}

/// A component that cranelift takes minutes to compile although it is under 1 MiB: one
/// function with `locals` locals and `operations` additions between them in a loop, about
/// 10 bytes each (10 000 and 90 000: 0.9 MB, past a minute to compile here; 2 000 and
/// 50 000 took 12-18 s and about 100 MiB).
pub fn slow_to_compile(locals: usize, operations: usize) -> Vec<u8> {
    use std::fmt::Write;
    let mut body = String::new();
    for i in 0..locals {
        write!(body, "(local $l{i} i32)").unwrap();
    }
    body.push_str("(loop $again ");
    for n in 0..operations {
        let (to, a, b) = (n % locals, (n * 7 + 3) % locals, (n * 13 + 5) % locals);
        write!(
            body,
            "(local.set $l{to} (i32.add (local.get $l{a}) (local.get $l{b})))"
        )
        .unwrap();
    }
    body.push_str("(br_if $again (local.get $l0)))");
    transformer(&body, "")
}

/// `component` with a custom section appended that makes it `padding` bytes larger, or
/// a little more.
pub fn padded(mut component: Vec<u8>, padding: usize) -> Vec<u8> {
    let name = b"padding";
    let mut section = leb128(name.len());
    section.extend_from_slice(name);
    section.resize(section.len() + padding, 0);
    component.push(0);
    component.extend(leb128(section.len()));
    component.extend(section);
    component
}

fn leb128(mut value: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes.push(byte);
            return bytes;
        }
        bytes.push(byte | 0x80);
    }
}
