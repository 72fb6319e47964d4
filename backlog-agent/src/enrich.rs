//! Who and where: what the agent adds to a decoded record before it is
//! reported. The processes holding a listener (`attribution`, walked off
//! the drain path by `resolver`), its cgroup, container and namespace
//! sysctls (`context`), UNIX listeners by path (`sockdiag`, `unix_listeners`), accept-queue
//! wait and rates (`accept_wait`) and the backlog advice drawn from them
//! (`advice`), and drops the kernel only counted (`counted`).

pub mod accept_wait;
pub mod advice;
pub mod attribution;
pub mod context;
pub mod counted;
pub mod resolver;
pub mod sockdiag;
pub mod unix_listeners;
