//! Activation checkpointing (`train.activation_checkpointing`): the chosen encoders' transformer
//! blocks keep only their inputs in the forward and run again in the backward
//! (`albef_torch_ext::checkpoint`), with the forward's dropout masks, so the gradients are the
//! same bit for bit.
//!
//! The choice is a mode of the calling thread, as autocast is: the trainer sets it around the
//! online forward ([`with`]), the blocks read it. A block run without grad (momentum encoders,
//! evaluation) runs plainly whatever the mode.

use albef_config::ActivationCheckpointing;
use std::cell::Cell;
use tch::Tensor;

thread_local! {
    static MODE: Cell<ActivationCheckpointing> = const { Cell::new(ActivationCheckpointing::None) };
}

/// Runs `f` with `mode`, then puts the thread's mode back (also when `f` unwinds).
pub fn with<T>(mode: ActivationCheckpointing, f: impl FnOnce() -> T) -> T {
    struct Restore(ActivationCheckpointing);
    impl Drop for Restore {
        fn drop(&mut self) {
            MODE.set(self.0);
        }
    }
    let _restore = Restore(MODE.replace(mode));
    f()
}

/// The thread's mode.
pub(crate) fn mode() -> ActivationCheckpointing {
    MODE.get()
}

/// `block(inputs)`, checkpointed: `params` are the tensors the block reads besides its inputs.
pub(crate) fn run<F>(block: F, inputs: &[&Tensor], params: &[&Tensor]) -> Tensor
where
    F: Fn(&[Tensor]) -> Tensor + Send + 'static,
{
    // As tch's operations do, a libtorch error in a forward panics.
    albef_torch_ext::checkpoint(block, inputs, params).unwrap_or_else(|e| panic!("a checkpointed block: {e}"))
}
