//! `datavault status`: is everything fine, and if not, what to do next. Reads only: it never
//! takes the lock, so it answers even while a backup runs. The facts and the advice come
//! from [`Health`]; the binary words them.

use crate::error::Result;
use crate::ops::health::{Advice, Health};
use crate::ops::Env;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub healthy: bool,
    #[serde(flatten)]
    pub health: Health,
    pub advice: Vec<Advice>,
}

pub fn run(env: &Env) -> Result<Status> {
    let health = Health::read(env, true);
    let advice = health.advice();
    Ok(Status { healthy: advice.is_empty(), health, advice })
}
