//! The scenarios; each `run(mode)` returns its figures, every one with its baseline measured
//! in the same process and the same run.

pub mod agent;
pub mod churn;
pub mod etcd;
pub mod fanout;
pub mod hit;
pub mod many;
pub mod runtimes;
pub mod storm;
