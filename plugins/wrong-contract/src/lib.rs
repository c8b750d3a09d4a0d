//! A component for a contract weir does not speak: it exports
//! `weir:transform/transformer@0.0.1`, whose `transform` takes and returns a string. The host must refuse it at start and name the mismatch.
#![no_std]

extern crate alloc;

#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// # Safety
/// Called by the component's host with the canonical ABI's arguments only.
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
    // SAFETY: the canonical ABI passes a power-of-two `align` and, for a reallocation, the
    // pointer and size of an earlier allocation made here.
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(old_ptr, Layout::from_size_align_unchecked(old_len, align), new_len)
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

wit_bindgen::generate!({
    inline: "
        package weir:transform@0.0.1;
        interface transformer {
            transform: func(text: string) -> string;
        }
        world plugin {
            export transformer;
        }
    ",
});

struct WrongContract;

impl exports::weir::transform::transformer::Guest for WrongContract {
    fn transform(text: alloc::string::String) -> alloc::string::String {
        text
    }
}

export!(WrongContract);
