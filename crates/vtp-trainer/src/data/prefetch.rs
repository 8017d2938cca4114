//! Batches made on worker threads, handed out in order: the prefetching
//! machinery both input pipelines (classification and detection) share.
//! Workers claim batch indices from a counter, so the batch *contents*
//! depend only on their index; the iterator reorders what arrives, so the
//! sequence is the same whatever the number of workers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

/// The batches of one pass, in order. Workers start when it is made and
/// stop when it is dropped.
#[derive(Debug)]
pub struct Batches<B> {
    rx: Option<crossbeam_channel::Receiver<(usize, B)>>,
    pending: BTreeMap<usize, B>,
    next: usize,
    batches: usize,
    /// Batches of no item (every image of it corrupt) are skipped.
    is_empty: fn(&B) -> bool,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl<B: Send + 'static> Batches<B> {
    /// Starts `workers` threads named `name`, each making batches with the
    /// closure `worker()` returns (made on this thread, so it can own
    /// per-thread scratch space), two batches ahead per worker.
    pub(crate) fn spawn<W>(
        name: &str,
        batches: usize,
        workers: usize,
        is_empty: fn(&B) -> bool,
        worker: impl Fn() -> W,
    ) -> Self
    where
        W: FnMut(usize) -> B + Send + 'static,
    {
        let workers = workers.max(1);
        let (tx, rx) = crossbeam_channel::bounded(workers * 2);
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..workers)
            .map(|_| {
                let (next, stop, tx) = (next.clone(), stop.clone(), tx.clone());
                let mut make = worker();
                std::thread::Builder::new()
                    .name(name.to_owned())
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let b = next.fetch_add(1, Ordering::Relaxed);
                            if b >= batches || tx.send((b, make(b))).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawn a loader thread")
            })
            .collect();
        Batches {
            rx: Some(rx),
            pending: BTreeMap::new(),
            next: 0,
            batches,
            is_empty,
            stop,
            handles,
        }
    }
}

impl<B> Iterator for Batches<B> {
    type Item = B;

    fn next(&mut self) -> Option<B> {
        while self.next < self.batches {
            if let Some(batch) = self.pending.remove(&self.next) {
                self.next += 1;
                if (self.is_empty)(&batch) {
                    continue; // every image of it was corrupt
                }
                return Some(batch);
            }
            let (b, batch) = self.rx.as_ref()?.recv().ok()?;
            self.pending.insert(b, batch);
        }
        None
    }
}

impl<B> Drop for Batches<B> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None;
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}
