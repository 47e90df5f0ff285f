//! keel-vmm: Keel's KVM virtual machine monitor.
