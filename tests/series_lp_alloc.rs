//! The parser must not allocate per line when lines have no escapes.
//! (Own test binary: it installs a counting global allocator.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tally::series::line_protocol::{parse_lines, Precision};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn no_allocation_per_line_without_escapes() {
    let mut input = Vec::new();
    for i in 0..10_000 {
        input.extend_from_slice(
            format!(
                "demo,host=h{},dc=x value={}.5,n={}i,s=\"ok\",b=t 17000000000{:08}\n",
                i % 7,
                i,
                i,
                i
            )
            .as_bytes(),
        );
    }
    let mut sum = 0.0;
    let before = ALLOCS.load(Ordering::Relaxed);
    let summary = parse_lines(&input, Precision::Nanoseconds, 0, |p| {
        sum += p.value().as_f64().unwrap_or(0.0)
    });
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(summary.points, 40_000);
    assert!(sum > 0.0);
    // Only the scratch vectors' initial growth.
    assert!(allocs <= 8, "{allocs} allocations for 10k lines");
}
