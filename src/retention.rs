//! Which archives to keep: keep_last / daily / weekly / monthly, like restic and borg.
//! (Being written: see the helper's task.)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_pre_restore: u32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy { keep_last: 7, keep_daily: 7, keep_weekly: 4, keep_monthly: 6, keep_pre_restore: 3 }
    }
}
