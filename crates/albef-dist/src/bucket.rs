//! DDP-style gradient bucketing: many small all-reduces cost a round trip each, so gradients of
//! the same dtype and device are flattened into buckets of about `bucket_bytes` and reduced
//! together; `all_reduce_buckets` once every gradient is there, or `all_reduce_while` as the
//! gradients are produced, so that communication overlaps the backward.

use crate::{Collective, ReduceOp};
use anyhow::{Context, Result, bail, ensure};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// PyTorch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// Which tensors of a list are reduced together, and in which order the buckets go.
///
/// Tensors are taken in a given order, grouped by (dtype, device) in order of first appearance
/// and packed in that order within a group; a tensor larger than `bucket_bytes` forms its own
/// bucket. Buckets go in that order unless [`BucketPlan::launching`] names another. What a bucket
/// holds depends only on the tensors' shapes and the packing order, and is all that decides the
/// arithmetic of the reduce: the launch order changes no bit of the result. Every rank that makes
/// the plan from the same list issues the same sequence of all-reduces.
pub struct BucketPlan {
    buckets: Vec<Vec<usize>>,
    /// Bucket indices in the order they go.
    launch: Vec<usize>,
    /// The bucket of each tensor of the list.
    bucket_of: Vec<usize>,
    /// (shape, dtype, device) of each tensor of the list: a gradient that never came is reduced
    /// as zeros of this shape, so that every rank still sends the same bytes.
    specs: Vec<(Vec<i64>, Kind, Device)>,
}

impl BucketPlan {
    /// Buckets over `tensors` (gradients, or the parameters they belong to) packed in `order`, a
    /// permutation of their indices.
    pub fn new(tensors: &[Tensor], order: &[usize], bucket_bytes: usize) -> Result<Self> {
        let n = tensors.len();
        ensure!(order.len() == n, "a bucket order of {} entries for {n} tensors", order.len());
        ensure!(is_permutation(order), "the packing order {order:?} is not a permutation");
        let mut groups: Vec<((Kind, Device), Vec<usize>)> = Vec::new();
        for &i in order {
            let key = (tensors[i].kind(), tensors[i].device());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let mut buckets = Vec::new();
        for (_, members) in groups {
            let mut bucket: Vec<usize> = Vec::new();
            let mut bytes = 0;
            for i in members {
                let size = tensors[i].numel() * tensors[i].kind().elt_size_in_bytes();
                if !bucket.is_empty() && bytes + size > bucket_bytes {
                    buckets.push(std::mem::take(&mut bucket));
                    bytes = 0;
                }
                bucket.push(i);
                bytes += size;
            }
            if !bucket.is_empty() {
                buckets.push(bucket);
            }
        }
        let mut bucket_of = vec![0; n];
        for (b, members) in buckets.iter().enumerate() {
            for &i in members {
                bucket_of[i] = b;
            }
        }
        let specs = tensors.iter().map(|t| (t.size(), t.kind(), t.device())).collect();
        Ok(BucketPlan { launch: (0..buckets.len()).collect(), buckets, bucket_of, specs })
    }

    /// The plan over `tensors` packed in their own order.
    pub fn in_order(tensors: &[Tensor], bucket_bytes: usize) -> Result<Self> {
        Self::new(tensors, &(0..tensors.len()).collect::<Vec<_>>(), bucket_bytes)
    }

    /// The same buckets, going in `launch` order (a permutation of the bucket indices).
    pub fn launching(mut self, launch: Vec<usize>) -> Result<Self> {
        ensure!(
            launch.len() == self.buckets.len() && is_permutation(&launch),
            "{launch:?} is not an order of {} buckets",
            self.buckets.len()
        );
        self.launch = launch;
        Ok(self)
    }

    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    fn tensors(&self) -> usize {
        self.bucket_of.len()
    }

    /// A zero tensor of the shape of tensor `i`.
    fn zeros(&self, i: usize) -> Tensor {
        let (shape, kind, device) = &self.specs[i];
        Tensor::zeros(shape.as_slice(), (*kind, *device))
    }
}

fn is_permutation(order: &[usize]) -> bool {
    let mut seen = vec![false; order.len()];
    order.iter().all(|&i| i < seen.len() && !std::mem::replace(&mut seen[i], true))
}

/// All-reduces `grads` in place, in buckets of about `bucket_bytes` (see [`BucketPlan`]); a
/// bucket of one contiguous gradient is reduced in place without a copy.
pub fn all_reduce_buckets(c: &dyn Collective, grads: &mut [Tensor], bucket_bytes: usize, op: ReduceOp) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    for (i, g) in grads.iter().enumerate() {
        ensure!(g.defined(), "all_reduce_buckets: gradient {i} is undefined");
    }
    let plan = BucketPlan::in_order(grads, bucket_bytes)?;
    let mut started = Started::default();
    for &b in &plan.launch {
        let bucket = plan.buckets[b].iter().map(|&i| grads[i].shallow_clone()).collect();
        started.start(c, b, bucket, op)?;
    }
    started.finish(c)
}

/// Bucket reduces started on a collective, and the flat copies whose results go back into their
/// bucket's tensors once they are done.
#[derive(Default)]
struct Started(Vec<(Vec<Tensor>, Tensor)>);

impl Started {
    /// Starts reducing bucket `b` in place: one all-reduce over a flat copy, or in place for
    /// one contiguous tensor.
    fn start(&mut self, c: &dyn Collective, b: usize, mut bucket: Vec<Tensor>, op: ReduceOp) -> Result<()> {
        let context = || format!("all-reducing gradient bucket {b}");
        if let [one] = &mut bucket[..]
            && one.is_contiguous()
        {
            c.start_all_reduce(one, op).with_context(context)?;
            return Ok(());
        }
        let flat: Vec<Tensor> = bucket.iter().map(|g| g.f_reshape([-1])).collect::<Result<_, _>>()?;
        let mut flat = Tensor::f_cat(&flat, 0)?;
        if c.start_all_reduce(&mut flat, op).with_context(context)? {
            copy_back(&mut bucket, &flat)?;
        } else {
            self.0.push((bucket, flat));
        }
        Ok(())
    }

    /// Waits for the started reduces and puts their results in place.
    fn finish(self, c: &dyn Collective) -> Result<()> {
        c.wait_started().context("waiting for the gradient all-reduces")?;
        for (mut bucket, flat) in self.0 {
            copy_back(&mut bucket, &flat)?;
        }
        Ok(())
    }
}

/// Copies a reduced flat bucket back into its tensors.
fn copy_back(bucket: &mut [Tensor], flat: &Tensor) -> Result<()> {
    let mut offset = 0;
    for g in bucket {
        let numel = g.numel() as i64;
        g.f_copy_(&flat.f_narrow(0, offset, numel)?.f_view(g.size().as_slice())?)?;
        offset += numel;
    }
    Ok(())
}

/// What an overlapped all-reduce cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OverlapTimes {
    /// Time the caller waited after its work for the reduces to end: the step's communication.
    pub waited_seconds: f64,
    /// Time the reducing thread spent in all-reduces, most of it alongside the caller's work.
    pub busy_seconds: f64,
}

/// Takes gradients as they complete, for [`all_reduce_while`]. Callable from any thread.
pub struct ReadyGradients {
    plan: Arc<BucketPlan>,
    state: Mutex<Launch>,
    to_reducer: Sender<Option<(usize, Vec<Tensor>)>>,
}

struct Launch {
    /// Reported gradients until their bucket goes.
    grads: Vec<Option<Tensor>>,
    arrived: Vec<bool>,
    /// Gradients each bucket still waits for.
    missing: Vec<usize>,
    /// How many buckets have gone: they go in the plan's launch order only.
    launched: usize,
    /// Buckets in the order they were complete.
    completed: Vec<usize>,
}

impl ReadyGradients {
    /// Gradient `i` of the plan's list is complete: a bucket goes out to be reduced as soon as it
    /// and every bucket before it are complete. A repeated or unknown index is ignored.
    pub fn ready(&self, i: usize, grad: Tensor) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if i >= s.arrived.len() || std::mem::replace(&mut s.arrived[i], true) {
            return;
        }
        s.grads[i] = Some(grad);
        let b = self.plan.bucket_of[i];
        s.missing[b] -= 1;
        if s.missing[b] == 0 {
            s.completed.push(b);
        }
        while s.launched < self.plan.launch.len() && s.missing[self.plan.launch[s.launched]] == 0 {
            self.send_next(&mut s, &|_| None);
        }
    }

    /// Sends the next bucket to go; a gradient that never came is taken from `grad_of`, else
    /// zeros.
    fn send_next(&self, s: &mut Launch, grad_of: &dyn Fn(usize) -> Option<Tensor>) {
        let b = self.plan.launch[s.launched];
        let bucket = self.plan.buckets[b]
            .iter()
            .map(|&i| s.grads[i].take().or_else(|| grad_of(i)).unwrap_or_else(|| self.plan.zeros(i)))
            .collect();
        s.launched += 1;
        // The reducer only stops at the end-of-step marker: a failed send cannot happen first.
        let _ = self.to_reducer.send(Some((b, bucket)));
    }
}

/// Sends the end-of-step marker when dropped, also when the caller's work unwinds, so that the
/// reducing thread always ends.
struct EndMarker(Sender<Option<(usize, Vec<Tensor>)>>);

impl Drop for EndMarker {
    fn drop(&mut self) {
        let _ = self.0.send(None);
    }
}

/// Runs `work` (a backward) while the gradients it reports through [`ReadyGradients::ready`] are
/// all-reduced in place, bucket by bucket (see [`BucketPlan`]), on a thread of their own. When
/// `work` returns, the buckets that are still incomplete go out with `grad_of(i)` (the tensor's
/// current gradient) for the gradients that were not reported, zeros for those that have none,
/// and this waits for every reduce. Returns `work`'s result, the order in which the buckets were
/// complete, all of them (a plan launching in that order reduces each as early as possible), and
/// the times.
///
/// Every rank must use the same plan; the sequence of all-reduces is then the same on every rank
/// whatever the order of the gradients.
pub fn all_reduce_while<R>(
    c: &dyn Collective,
    plan: &Arc<BucketPlan>,
    op: ReduceOp,
    grad_of: &dyn Fn(usize) -> Option<Tensor>,
    work: impl FnOnce(&Arc<ReadyGradients>) -> R,
) -> Result<(R, Vec<usize>, OverlapTimes)> {
    let n = plan.tensors();
    let (to_reducer, from_callers) = channel();
    let ready = Arc::new(ReadyGradients {
        plan: plan.clone(),
        state: Mutex::new(Launch {
            grads: (0..n).map(|_| None).collect(),
            arrived: vec![false; n],
            missing: plan.buckets.iter().map(Vec::len).collect(),
            launched: 0,
            completed: Vec::with_capacity(plan.buckets.len()),
        }),
        to_reducer: to_reducer.clone(),
    });
    std::thread::scope(|scope| {
        let reducer = scope.spawn(|| reduce_arrivals(c, op, from_callers));
        let end = EndMarker(to_reducer);
        let out = work(&ready);
        let finished = Instant::now();
        let completed = {
            let mut s = ready.state.lock().unwrap_or_else(PoisonError::into_inner);
            let mut completed = std::mem::take(&mut s.completed);
            let mut done = vec![false; plan.buckets.len()];
            completed.iter().for_each(|&b| done[b] = true);
            completed.extend((0..plan.buckets.len()).filter(|&b| !done[b]));
            while s.launched < plan.launch.len() {
                ready.send_next(&mut s, grad_of);
            }
            completed
        };
        drop(end);
        let busy_seconds = match reducer.join() {
            Ok(result) => result?,
            Err(_) => bail!("the gradient reducing thread panicked"),
        };
        Ok((out, completed, OverlapTimes { waited_seconds: finished.elapsed().as_secs_f64(), busy_seconds }))
    })
}

/// The reducing thread: starts reducing each bucket that arrives, until the end-of-step marker,
/// then waits for them all; after a failure it only drains. Returns the time spent reducing.
fn reduce_arrivals(c: &dyn Collective, op: ReduceOp, arrivals: Receiver<Option<(usize, Vec<Tensor>)>>) -> Result<f64> {
    let _no_grad = tch::no_grad_guard();
    let (mut busy, mut failed, mut started) = (0.0, None, Started::default());
    while let Ok(Some((b, bucket))) = arrivals.recv() {
        if failed.is_some() {
            continue;
        }
        let at = Instant::now();
        failed = started.start(c, b, bucket, op).err();
        busy += at.elapsed().as_secs_f64();
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let at = Instant::now();
    started.finish(c)?;
    Ok(busy + at.elapsed().as_secs_f64())
}
