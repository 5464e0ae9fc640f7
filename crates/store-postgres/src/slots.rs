//! Slot claims: a scheduled slot of a job fires once across all masters.
//!
//! Before firing a cron slot, the job's holder inserts the row (job, slot) into
//! `slot_claims` under its fence. The primary key lets exactly one insert succeed whoever
//! tries, and the fence refuses a master whose lease is gone. Around a takeover, the new
//! holder finds the slots its predecessor claimed and does not fire them again; a run that
//! such a slot started is resumed from the `runs` and `machines` rows instead (see
//! docs/HA.md). The claim and the run's first row belong in the same fenced transaction, so
//! that a slot is never claimed without its run being recorded.

use time::OffsetDateTime;
use tokio_postgres::Transaction;

use crate::lease::{Fence, begin_fenced};
use crate::{Database, Result};

/// Claims `slot` of the fence's job inside `tx` (a transaction from [`begin_fenced`]).
/// `true` if this call claimed it, `false` if it was already claimed.
pub async fn claim_slot_in(
    tx: &Transaction<'_>,
    fence: &Fence,
    slot: OffsetDateTime,
) -> Result<bool> {
    let n = tx
        .execute(
            "INSERT INTO slot_claims (job, slot, epoch, master) VALUES ($1, $2, $3, $4)
             ON CONFLICT (job, slot) DO NOTHING",
            &[&fence.job, &slot, &fence.epoch.0, &fence.master],
        )
        .await?;
    Ok(n == 1)
}

impl Database {
    /// Claims `slot` of the fence's job on its own: `true` if this call claimed it, `false` if
    /// it was already claimed, [`crate::Error::LostLease`] if the fence no longer holds.
    pub async fn claim_slot(&self, fence: &Fence, slot: OffsetDateTime) -> Result<bool> {
        self.timed(async {
            let mut client = self.client().await?;
            let tx = begin_fenced(&mut client, fence).await?;
            let claimed = claim_slot_in(&tx, fence, slot).await?;
            tx.commit().await?;
            Ok(claimed)
        })
        .await
    }

    /// Who claimed `slot` of `job`, at which epoch, if anyone did.
    pub async fn slot_claim(
        &self,
        job: &str,
        slot: OffsetDateTime,
    ) -> Result<Option<(String, crate::Epoch)>> {
        self.timed(async {
            let row = self
                .client()
                .await?
                .query_opt(
                    "SELECT master, epoch FROM slot_claims WHERE job = $1 AND slot = $2",
                    &[&job, &slot],
                )
                .await?;
            row.map(|r| Ok((r.try_get(0)?, crate::Epoch(r.try_get(1)?))))
                .transpose()
        })
        .await
    }

    /// Deletes claims of slots before `before`: once a slot is that old, no master would fire
    /// it again anyway (the scheduler only looks at recent slots). Returns how many went.
    pub async fn prune_slot_claims(&self, before: OffsetDateTime) -> Result<u64> {
        self.timed(async {
            Ok(self
                .client()
                .await?
                .execute("DELETE FROM slot_claims WHERE slot < $1", &[&before])
                .await?)
        })
        .await
    }
}
