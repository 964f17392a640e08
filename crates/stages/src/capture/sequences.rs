//! Rows to token sequences: each row tokenized (plain or chat), the positions to store marked, and the
//! documents cut or packed into sequences of `context` tokens in a fixed order, up to the token budget.
//! The order is fixed so that a resumed run can skip batches by counting them.

use std::collections::VecDeque;

use saeflow_core::data::rows::Row;
use saeflow_core::models::LoadedModel;

use super::{CaptureParams, Positions};
use crate::shared::Template;

/// One token of a document on its way through the model.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    /// Index into the rows.
    pub(super) row: u32,
    pub(super) pos: u32,
    pub(super) token: u32,
    pub(super) completion: bool,
    pub(super) store: bool,
    /// Position in its forward sequence (set when the sequence is cut).
    pub(super) seq_pos: u32,
    /// Would be stored but is among its sequence's first `drop_first` (an attention sink): not stored, but
    /// its norm is measured for the capture's sink report.
    pub(super) sink: bool,
}

/// Turns rows into the sequences the model runs over, in a fixed order, honouring the token budget.
pub(super) struct Sequences<'a> {
    p: &'a CaptureParams,
    model: &'a LoadedModel,
    rows: &'a [Row],
    order: std::iter::Copied<std::slice::Iter<'a, usize>>,
    pending: VecDeque<Entry>,
    budget: u64,
    pub(super) stored: u64,
    pub(super) documents: u64,
    last_document: u32,
    pub(super) truncated: u64,
    /// The BOS token sequences may start with (`None`: none is prepended).
    bos: Option<u32>,
    /// Tokens left out as sequence-start sinks (`drop_first`).
    pub(super) dropped_first: u64,
}

impl<'a> Sequences<'a> {
    pub(super) fn new(
        p: &'a CaptureParams,
        model: &'a LoadedModel,
        rows: &'a [Row],
        order: &'a [usize],
    ) -> Self {
        Self {
            p,
            model,
            rows,
            order: order.iter().copied(),
            pending: VecDeque::new(),
            budget: p.tokens.unwrap_or(u64::MAX),
            stored: 0,
            documents: 0,
            last_document: u32::MAX,
            truncated: 0,
            bos: model.bos.filter(|_| p.bos),
            dropped_first: 0,
        }
    }

    /// The tokens of one row, with the positions to store marked.
    fn document(&mut self, index: usize) -> anyhow::Result<Vec<Entry>> {
        let row = &self.rows[index];
        let tok = &self.model.tokenizer;
        let (prompt, completion) = match self.p.template {
            Template::None => match &row.completion {
                Some(c) => (
                    tok.encode(row.prompt.as_deref().unwrap_or(""))?,
                    tok.encode(c)?,
                ),
                None => (tok.encode(&row.text)?, Vec::new()),
            },
            // A row's `system` column (a `generate` stage's system message) is rendered as it was given.
            Template::Chat => {
                let system = row.extra.get("system").map(String::as_str);
                match &row.completion {
                    Some(c) => self.model.chat_tokens_with_system(
                        system,
                        row.prompt.as_deref().unwrap_or(""),
                        Some(c),
                    )?,
                    None => self
                        .model
                        .chat_tokens_with_system(system, &row.text, None)?,
                }
            }
        };
        // A chat template that writes BOS itself (Llama 3's) already put it first.
        let bos = self
            .model
            .bos
            .filter(|b| self.p.bos && prompt.first() != Some(b));
        let prompt_end = bos.iter().len() + prompt.len();
        let mut ids: Vec<u32> = bos.into_iter().chain(prompt).chain(completion).collect();
        if !self.p.pack && ids.len() > self.p.context {
            ids.truncate(self.p.context);
            self.truncated += 1;
        }
        let n = ids.len();
        let keep = |i: usize| match self.p.positions {
            Positions::All => !(i == 0 && bos.is_some() && self.p.exclude_bos),
            Positions::Completion => i >= prompt_end,
            Positions::Last => i + 1 == n,
            Positions::LastPrompt => i + 1 == prompt_end,
        };
        Ok(ids
            .iter()
            .enumerate()
            .map(|(i, &token)| Entry {
                row: index as u32,
                pos: i as u32,
                token,
                completion: i >= prompt_end,
                store: keep(i),
                seq_pos: 0,
                sink: false,
            })
            .collect())
    }

    /// The next sequence with at least one token to store, cut after its last stored token (attention is
    /// causal, so later tokens cannot change it); `None` when the rows or the budget are used up.
    pub(super) fn next_sequence(&mut self) -> anyhow::Result<Option<Vec<Entry>>> {
        loop {
            if self.stored >= self.budget {
                return Ok(None);
            }
            while self.pending.len() < self.p.context || !self.p.pack {
                let Some(index) = self.order.next() else {
                    break;
                };
                let doc = self.document(index)?;
                self.pending.extend(doc);
                if !self.p.pack {
                    break;
                }
            }
            if self.pending.is_empty() {
                return Ok(None);
            }
            let take = self.p.context.min(self.pending.len());
            let mut seq: Vec<Entry> = self.pending.drain(..take).collect();
            for (i, e) in seq.iter_mut().enumerate() {
                e.seq_pos = i as u32;
                let sink = match self.p.drop_first {
                    Some(n) => e.seq_pos < n,
                    None => e.seq_pos == 0 && Some(e.token) != self.bos,
                };
                if e.store && sink {
                    e.store = false;
                    e.sink = true;
                    self.dropped_first += 1;
                }
                if e.store {
                    if self.stored < self.budget {
                        self.stored += 1;
                    } else {
                        e.store = false;
                    }
                }
            }
            if let Some(last) = seq.iter().rposition(|e| e.store) {
                seq.truncate(last + 1);
                for e in seq.iter().filter(|e| e.store) {
                    // A document's tokens are contiguous in the stream, so each change of row is a new one.
                    if e.row != self.last_document {
                        self.last_document = e.row;
                        self.documents += 1;
                    }
                }
                return Ok(Some(seq));
            }
        }
    }

    /// The next batch of up to `batch_size` sequences.
    pub(super) fn next_batch(&mut self) -> anyhow::Result<Vec<Vec<Entry>>> {
        let mut batch = Vec::new();
        while batch.len() < self.p.batch_size {
            match self.next_sequence()? {
                Some(s) => batch.push(s),
                None => break,
            }
        }
        Ok(batch)
    }
}
