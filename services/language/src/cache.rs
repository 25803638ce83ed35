//! What the engine keeps per running sequence between steps, preallocated once for every slot:
//! a transformer's KV cache `[layers, max_batch, heads, context, head_dim]` (keys and values),
//! or a recurrent model's state `[max_batch, state_size]` (no context axis: an LSTM's state is
//! the same size after one token or ten thousand). Slots are rows of these buffers; a decode step
//! passes `narrow` views over slots `0..n` and the module writes through them in place.

use tch::{Device, IValue, Kind, Tensor};

use crate::model::Architecture;

/// The fixed shape of the model, from `model.toml`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub architecture: Architecture,
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub state_size: usize,
    pub context: usize,
    pub vocab: usize,
    pub eos: u32,
}

pub enum Cache {
    Kv { k: Tensor, v: Tensor },
    State(Tensor),
}

/// What `prefill` returned besides the logits, for the rows of its batch.
pub enum Prefilled {
    Kv { k: Tensor, v: Tensor },
    State(Tensor),
}

impl Cache {
    /// Zeroed buffers for `slots` sequences (zeros: stale slots must hold finite values, which
    /// the contract lets models rely on when they mask). An allocation the device cannot make
    /// (a GPU too small for `max_batch_size` × context) is an error naming the size, so the
    /// version is refused instead of the process aborting.
    pub fn new(shape: &Shape, slots: usize, device: Device) -> Result<Self, String> {
        let zeros = |dims: &[i64]| {
            Tensor::f_zeros(dims, (Kind::Float, device)).map_err(|e| {
                let mib = (dims.iter().product::<i64>() * 4) >> 20;
                format!(
                    "cannot allocate the {} cache ({mib} MiB, {dims:?}) on {device:?}; lower \
                     `language.max_batch_size` or the context: {e}",
                    match shape.architecture {
                        Architecture::Transformer => "KV",
                        Architecture::Recurrent => "state",
                    }
                )
            })
        };
        Ok(match shape.architecture {
            Architecture::Transformer => {
                let dims = [
                    shape.layers as i64,
                    slots as i64,
                    shape.heads as i64,
                    shape.context as i64,
                    shape.head_dim as i64,
                ];
                Self::Kv {
                    k: zeros(&dims)?,
                    v: zeros(&dims)?,
                }
            }
            Architecture::Recurrent => {
                Self::State(zeros(&[slots as i64, shape.state_size as i64])?)
            }
        })
    }

    /// Bytes the buffers hold.
    pub fn bytes(&self) -> usize {
        let numel = |t: &Tensor| t.numel() * 4;
        match self {
            Self::Kv { k, v } => numel(k) + numel(v),
            Self::State(s) => numel(s),
        }
    }

    /// Copies the sequence in slot `from` (its first `len` positions) into slot `to`.
    pub fn copy_slot(&self, from: usize, to: usize, len: usize) {
        match self {
            Self::Kv { k, v } => {
                for cache in [k, v] {
                    let src = cache.narrow(1, from as i64, 1).narrow(3, 0, len as i64);
                    cache
                        .narrow(1, to as i64, 1)
                        .narrow(3, 0, len as i64)
                        .copy_(&src);
                }
            }
            Self::State(s) => {
                let src = s.narrow(0, from as i64, 1);
                s.narrow(0, to as i64, 1).copy_(&src);
            }
        }
    }

    /// Stores row `row` of a prefill's output (a prompt of `len` tokens) in `slot`.
    pub fn store(&self, out: &Prefilled, row: usize, slot: usize, len: usize) {
        match (self, out) {
            (Self::Kv { k, v }, Prefilled::Kv { k: nk, v: nv }) => {
                for (cache, new) in [(k, nk), (v, nv)] {
                    cache
                        .narrow(1, slot as i64, 1)
                        .narrow(3, 0, len as i64)
                        .copy_(&new.narrow(1, row as i64, 1).narrow(3, 0, len as i64));
                }
            }
            (Self::State(s), Prefilled::State(ns)) => {
                s.narrow(0, slot as i64, 1)
                    .copy_(&ns.narrow(0, row as i64, 1));
            }
            // `parse_prefill` builds `Prefilled` of the cache's own kind.
            _ => unreachable!("prefill output of another architecture"),
        }
    }

    /// The cache arguments of `decode` for slots `0..n` whose positions are below `span`.
    pub fn views(&self, n: usize, span: usize) -> Vec<IValue> {
        match self {
            Self::Kv { k, v } => [k, v]
                .into_iter()
                .map(|c| IValue::Tensor(c.narrow(1, 0, n as i64).narrow(3, 0, span as i64)))
                .collect(),
            Self::State(s) => vec![IValue::Tensor(s.narrow(0, 0, n as i64))],
        }
    }

    /// Splits `prefill`'s return value: `(logits, keys, values)` for a transformer, `(logits,
    /// state)` for a recurrent model; checks the per-row shapes against the model's.
    pub fn parse_prefill(
        &self,
        shape: &Shape,
        out: IValue,
        rows: usize,
    ) -> Result<(Tensor, Prefilled), String> {
        let IValue::Tuple(parts) = out else {
            return Err("prefill must return a tuple".into());
        };
        let tensors: Vec<Tensor> = parts
            .into_iter()
            .map(|p| match p {
                IValue::Tensor(t) => Ok(t),
                _ => Err("prefill must return tensors only".to_string()),
            })
            .collect::<Result<_, _>>()?;
        match (self, <[Tensor; 3]>::try_from(tensors)) {
            (Self::Kv { .. }, Ok([logits, k, v])) => {
                let want = [
                    shape.layers as i64,
                    rows as i64,
                    shape.heads as i64,
                    shape.head_dim as i64,
                ];
                for (name, t) in [("keys", &k), ("values", &v)] {
                    let s = t.size();
                    if s.len() != 5 || [s[0], s[1], s[2], s[4]] != want {
                        return Err(format!(
                            "prefill returned {name} of shape {s:?}; expected [{}, {rows}, {}, T, {}] (num_layers, batch, num_heads, tokens, head_dim)",
                            shape.layers, shape.heads, shape.head_dim
                        ));
                    }
                }
                Ok((logits, Prefilled::Kv { k, v }))
            }
            (Self::State(_), Err(tensors)) if tensors.len() == 2 => {
                let [logits, state] = <[Tensor; 2]>::try_from(tensors)
                    .map_err(|_| "prefill must return (logits, state)".to_string())?;
                let s = state.size();
                if s != [rows as i64, shape.state_size as i64] {
                    return Err(format!(
                        "prefill returned a state of shape {s:?}; expected [{rows}, {}] (batch, state_size)",
                        shape.state_size
                    ));
                }
                Ok((logits, Prefilled::State(state)))
            }
            (Self::Kv { .. }, _) => {
                Err("prefill of a transformer must return (logits, keys, values)".into())
            }
            (Self::State(_), _) => {
                Err("prefill of a recurrent model must return (logits, state)".into())
            }
        }
    }
}
