//! Per-thread shards for what every request records (issue 17): each worker thread
//! writes only its own shard, readers add the shards up. A counter that every core
//! increments moves its cache line from core to core on each write; a shard per thread
//! keeps the line in the writer's cache.
//!
//! A thread gets its shard number the first time it records anything, round-robin, and
//! keeps it: the async runtime's workers, which record nearly everything, start first
//! and so get distinct shards. A thread beyond the shard count shares one, which is
//! correct (shards are atomics) and only slower.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many shards a sharded value has: one per CPU the process may use, at most 64.
pub(crate) fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(64)))
}

/// This thread's shard number, below [`count`].
#[inline]
pub(crate) fn index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % count();
    }
    INDEX.with(|i| *i)
}

/// Keeps what it holds on cache lines of its own, so that two shards next to each other
/// in an array never share a line. 128 bytes: x86's adjacent-line prefetcher pulls
/// lines in pairs, so 64 would still let neighbours disturb each other.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_get_shards_in_range_and_keep_them() {
        let mine = index();
        assert!(mine < count());
        assert_eq!(index(), mine);
        let others: Vec<usize> = (0..8)
            .map(|_| std::thread::spawn(index).join().unwrap())
            .collect();
        assert!(others.iter().all(|&i| i < count()), "{others:?}");
        assert_eq!(align_of::<Padded<u64>>(), 128);
    }
}
