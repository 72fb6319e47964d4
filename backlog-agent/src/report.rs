//! Every format the user sees, in one wing: event lines (`output`), the
//! per-listener summary table (`summary`) and its diagnoses (`diagnosis`),
//! and the Prometheus metrics (`metrics`).

pub mod diagnosis;
pub mod metrics;
pub mod output;
pub mod summary;
