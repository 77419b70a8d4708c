//! A peer that announces large frames and then sends almost nothing must not make the reader
//! hold the announced sizes. Counted with an allocator that tracks live heap bytes, so the
//! figure is exact rather than read off the process's resident memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use coordinator_free::job::proto::JobFrame;
use coordinator_free::wire;
use tokio::io::AsyncWriteExt;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[tokio::test(flavor = "current_thread")]
async fn announced_lengths_are_not_allocated_before_their_bytes_arrive() {
    const STREAMS: usize = 200;
    // A report frame may be ~8 MiB: 200 of them announced would be 1.6 GB if taken at their
    // word.
    let announced: u32 = 8 << 20;
    let before = LIVE.load(Ordering::Relaxed);
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..STREAMS {
        let (mut ours, theirs) = tokio::io::duplex(64 << 10);
        let mut header = vec![JobFrame::KIND_REPORT];
        header.extend_from_slice(&announced.to_be_bytes());
        header.extend_from_slice(&[0u8; 100]);
        ours.write_all(&header).await.expect("write");
        writers.push(ours);
        readers.push(tokio::spawn(async move {
            let mut theirs = theirs;
            wire::read::<JobFrame, _>(&mut theirs).await.map(|_| ())
        }));
    }
    // Let every reader take what was sent and wait for the rest.
    for _ in 0..20 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held = LIVE.load(Ordering::Relaxed) - before;
    assert!(
        held < (STREAMS as isize) * (256 << 10),
        "{STREAMS} stalled frames hold {held} bytes"
    );
    // The senders give up: every read ends as a cut frame, not as a message.
    drop(writers);
    for reader in readers {
        assert!(matches!(
            reader.await.expect("reader task"),
            Err(wire::WireError::Truncated)
        ));
    }
}
