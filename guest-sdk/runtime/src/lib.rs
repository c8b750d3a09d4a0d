//! The runtime a `no_std` weir plugin needs on wasm32: a global allocator, a panic handler
//! and the canonical ABI's `cabi_realloc` export. Plugins get it through the guest SDK's
//! `runtime` feature; it is its own crate so that components which do not use the SDK's
//! contract bindings (test plugins for other contracts) can link it too.
//!
//! On other targets it is empty. Do not use it with `std`, whose runtime provides all three.
#![no_std]

#[cfg(target_arch = "wasm32")]
extern crate alloc;

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// The canonical ABI's allocator export. std builds get it from wasi-libc; `no_std`
/// builds for `wasm32-wasip2` would otherwise lack it and fail to link as a component.
///
/// # Safety
/// Called by the component's host with the canonical ABI's arguments only.
#[cfg(all(target_arch = "wasm32", target_env = "p2"))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, realloc};
    if new_len == 0 {
        return align as *mut u8;
    }
    // SAFETY: the canonical ABI passes a power-of-two `align` and, for a reallocation,
    // the pointer and size of an earlier allocation made here.
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}

/// A panic aborts the call: the host sees a trap and dead-letters the input.
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}
