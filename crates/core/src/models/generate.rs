//! Generation with a KV cache: greedy or seeded sampling (temperature, top-k, top-p), stop tokens, and the
//! caller's hooks (interventions) active in prefill and in every decode step.

use candle_core::Tensor;

use super::transformer::{Hooks, KvCache, Transformer};

/// Sampling settings; `temperature == 0` means greedy.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Softmax temperature (0 = argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = all).
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// splitmix64: a small, seedable generator so sampling is reproducible without extra dependencies.
struct Rng(u64);
impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn pick(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / s.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= s.top_p
        });
        let n = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(n);
        order.truncate(n);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return order[i] as u32;
        }
        u -= p;
    }
    order[probs.len() - 1] as u32
}

/// Continues `prompt` by up to `max_new` tokens, stopping after any of `stop` (or where the next input
/// would pass the model's context). Returns the new tokens.
pub fn generate(
    model: &Transformer,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    sampling: &Sampling,
    hooks: &Hooks,
) -> anyhow::Result<Vec<u32>> {
    let rows = generate_rows(
        model,
        &[prompt.to_vec()],
        max_new,
        stop,
        std::slice::from_ref(sampling),
        hooks,
    )?;
    Ok(rows.into_iter().next().unwrap_or_default())
}

/// Top-k (id, logit) pairs of a `[vocab]` logits tensor, highest first (ties by lower id).
pub fn top_k(logits: &Tensor, k: usize) -> anyhow::Result<Vec<(u32, f32)>> {
    let v = logits
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    Ok(idx.into_iter().take(k).map(|i| (i as u32, v[i])).collect())
}

/// Continues each prompt as [`generate`] would, all in one batch: prompts are left-padded to one length
/// (the padding masked and each row's positions counted from its first real token, see
/// [`Transformer::forward_padded`]), share one KV cache, and each row stops on its own (a stop token, its
/// `max_new`, or the model's context), leaving the batch and the cache. Sampling seeds are
/// offset by the prompt's index so a batch is reproducible and its members differ.
pub fn generate_batch(
    model: &Transformer,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
    sampling: &Sampling,
    hooks: &Hooks,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let samplings: Vec<Sampling> = (0..prompts.len())
        .map(|i| Sampling {
            seed: sampling.seed.wrapping_add(i as u64),
            ..sampling.clone()
        })
        .collect();
    generate_rows(model, prompts, max_new, stop, &samplings, hooks)
}

/// [`generate_batch`] with each row's own sampling settings (`samplings[i]` for `prompts[i]`).
pub fn generate_rows(
    model: &Transformer,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
    samplings: &[Sampling],
    hooks: &Hooks,
) -> anyhow::Result<Vec<Vec<u32>>> {
    generate_rows_until(
        model,
        prompts,
        max_new,
        stop,
        samplings,
        hooks,
        &mut |_, _| false,
    )
}

/// [`generate_rows`] that also stops row `i` as soon as `done(i, tokens so far)` says so (stop strings:
/// the caller decodes and looks). `done` sees each row's new tokens after every step, in row order.
pub fn generate_rows_until(
    model: &Transformer,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
    samplings: &[Sampling],
    hooks: &Hooks,
    done: &mut dyn FnMut(usize, &[u32]) -> bool,
) -> anyhow::Result<Vec<Vec<u32>>> {
    if samplings.len() != prompts.len() {
        anyhow::bail!(
            "{} samplings for {} prompts",
            samplings.len(),
            prompts.len()
        );
    }
    if prompts.iter().any(Vec::is_empty) {
        anyhow::bail!("cannot generate from an empty prompt");
    }
    let Some(longest) = prompts.iter().map(Vec::len).max() else {
        return Ok(Vec::new());
    };
    let limit = model.config.max_seq_len;
    let mut hooks = hooks.clone();
    hooks.logits = true;
    hooks.last_logits = true;
    let mut padding: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut rngs: Vec<Rng> = samplings.iter().map(|s| Rng(s.seed)).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    // A row is live while it may still grow: it stops when its next input would pass the context, after a
    // stop token, or at `max_new`.
    let mut live: Vec<bool> = prompts
        .iter()
        .map(|p| p.len() <= limit && max_new > 0)
        .collect();
    // Padding uses token 0: masked, it only has to be a valid id.
    let first: Vec<u32> = prompts
        .iter()
        .zip(&padding)
        .flat_map(|(p, &pad)| std::iter::repeat_n(0, pad).chain(p.iter().copied()))
        .collect();
    let device = model.device();
    let mut input = Tensor::from_vec(first, (prompts.len(), longest), device)?;
    let mut cache = KvCache::default();
    // Batch row → prompt index; rows leave the batch (and the cache) as they finish.
    let mut rows: Vec<usize> = (0..prompts.len()).collect();
    loop {
        let keep: Vec<usize> = (0..rows.len()).filter(|&r| live[rows[r]]).collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < rows.len() {
            let index = Tensor::from_vec(
                keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                keep.len(),
                device,
            )?;
            cache.keep_rows(&index)?;
            input = input.index_select(&index, 0)?;
            rows = keep.iter().map(|&r| rows[r]).collect();
            padding = keep.iter().map(|&r| padding[r]).collect();
        }
        let logits = model
            .forward_padded(&input, &hooks, Some(&mut cache), &padding)?
            .logits
            .expect("logits requested");
        let last = logits
            .narrow(1, logits.dim(1)? - 1, 1)?
            .squeeze(1)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(rows.len());
        for (&i, row) in rows.iter().zip(&last) {
            let token = pick(row, &samplings[i], &mut rngs[i]);
            out[i].push(token);
            next.push(token);
            // Another step would feed prompt + generated positions: not past the context.
            let length = prompts[i].len() + out[i].len();
            if stop.contains(&token)
                || out[i].len() >= max_new
                || length > limit
                || done(i, &out[i])
            {
                live[i] = false;
            }
        }
        input = Tensor::from_vec(next, (rows.len(), 1), device)?;
    }
    Ok(out)
}
