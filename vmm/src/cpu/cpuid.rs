//! Per-vCPU CPUID: what KVM supports, with the topology rewritten for this VM's vCPU
//! count and the bits a paravirtualised guest looks for.
//!
//! Linux needs the hypervisor bit (leaf 1 ECX 31) and the KVM signature leaves to use
//! kvmclock; without them its boot here took twice as long. APIC IDs are the vCPU
//! indexes, one core per vCPU, one package. PKU is hidden: TCG-based hosts advertise it
//! with inconsistent XSAVE sizes and the guest then warns about XSAVE.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

use super::CpuError;

const LEAF_VENDOR: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_EXT_FEATURES: u32 = 7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
/// XCR0 bit of the PKRU state component (follows PKU).
const XSTATE_PKRU: u32 = 9;
/// Legacy FXSAVE area plus the XSAVE header.
const XSAVE_BASE_SIZE: u32 = 576;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const ECX7_PKU: u32 = 1 << 3;
const ECX7_OSPKE: u32 = 1 << 4;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Bits needed to number `n` items (0 for 1).
fn id_bits(n: u8) -> u32 {
    (u32::from(n).max(1) - 1).checked_ilog2().map(|l| l + 1).unwrap_or(0)
}

fn topology_entries(function: u32, apic_id: u8, cpus: u8) -> Vec<kvm_cpuid_entry2> {
    let apic = u32::from(apic_id);
    let entry = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic,
        ..Default::default()
    };
    vec![
        // SMT level: one thread per core, so no APIC ID bits.
        entry(0, 0, 1, LEVEL_SMT << 8),
        // Core level: all vCPUs are cores of one package.
        entry(1, id_bits(cpus), u32::from(cpus), (LEVEL_CORE << 8) | 1),
        // Terminator: level type 0.
        entry(2, 0, 0, 2),
    ]
}

/// Size of an XSAVE area holding every user state component in `mask` (standard format:
/// each component at its CPUID-given offset).
fn xsave_max_size(supported: &CpuId, mask: u32) -> u32 {
    supported
        .as_slice()
        .iter()
        .filter(|e| e.function == LEAF_XSAVE && (2..32).contains(&e.index))
        .filter(|e| mask & (1 << e.index) != 0)
        .map(|e| e.ebx + e.eax)
        .fold(XSAVE_BASE_SIZE, u32::max)
}

/// The CPUID table for vCPU `apic_id` of a `cpus`-vCPU VM.
///
/// `tsc_deadline`: KVM's LAPIC emulates the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER)
/// but KVM_GET_SUPPORTED_CPUID does not report it; with it the guest skips LAPIC timer
/// calibration.
pub fn for_vcpu(supported: &CpuId, apic_id: u8, cpus: u8, tsc_deadline: bool) -> Result<CpuId, CpuError> {
    let apic = u32::from(apic_id);
    let max_basic = supported
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map(|e| e.eax)
        .unwrap_or(0);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 4);
    let mut has_hypervisor_leaf = false;
    let mut has_kvm_features = false;

    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | (u32::from(cpus) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26] cores per package - 1, EAX[25:14] threads sharing this
                // cache - 1: L1/L2 are per core, L3 is shared by the package.
                let cache_type = e.eax & 0x1f;
                let level = (e.eax >> 5) & 0x7;
                e.eax &= 0x3fff;
                if cache_type != 0 {
                    e.eax |= (u32::from(cpus) - 1) << 26;
                    if level >= 3 {
                        e.eax |= (u32::from(cpus) - 1) << 14;
                    }
                }
            }
            LEAF_EXT_FEATURES if e.index == 0 => e.ecx &= !(ECX7_PKU | ECX7_OSPKE),
            // With PKU hidden, PKRU must leave the XSAVE feature mask and sizes too, or
            // the guest's XSAVE size check fails.
            LEAF_XSAVE if e.index == 0 => {
                e.eax &= !(1 << XSTATE_PKRU);
                e.ecx = xsave_max_size(supported, e.eax);
            }
            LEAF_XSAVE if e.index == XSTATE_PKRU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // Rebuilt below from scratch for this VM's topology.
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => continue,
            LEAF_HYPERVISOR => {
                has_hypervisor_leaf = true;
                e.eax = e.eax.max(LEAF_KVM_FEATURES);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            LEAF_KVM_FEATURES => has_kvm_features = true,
            LEAF_AMD_SIZES => {
                // ECX[7:0] cores - 1, ECX[15:12] APIC ID bits for the core number.
                e.ecx = (e.ecx & !0xf0ff) | (u32::from(cpus) - 1) | (id_bits(cpus) << 12);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic;
                e.ebx = apic & 0xff; // one thread per compute unit, unit = vCPU
                e.ecx = 0; // one node, node 0
            }
            _ => {}
        }
        out.push(e);
    }
    if max_basic >= LEAF_TOPOLOGY {
        out.extend(topology_entries(LEAF_TOPOLOGY, apic_id, cpus));
    }
    if max_basic >= LEAF_TOPOLOGY_V2 && supported.as_slice().iter().any(|e| e.function == LEAF_TOPOLOGY_V2) {
        out.extend(topology_entries(LEAF_TOPOLOGY_V2, apic_id, cpus));
    }
    if !has_hypervisor_leaf {
        let [ebx, ecx, edx] = KVM_SIGNATURE;
        out.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: LEAF_KVM_FEATURES,
            ebx,
            ecx,
            edx,
            ..Default::default()
        });
    }
    if !has_kvm_features {
        out.push(kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            ..Default::default()
        });
    }
    CpuId::from_entries(&out).map_err(|e| CpuError::Setup {
        id: apic_id,
        what: "building CPUID",
        reason: format!("{e:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ecx: ECX7_PKU | 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn per_vcpu_ids_and_hypervisor_bits() {
        let c = for_vcpu(&supported(), 3, 4, true).unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "low bits kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(find(&c, 7, 0).ecx, 1, "PKU hidden, rest kept");
        let sig = find(&c, LEAF_HYPERVISOR, 0);
        assert_eq!([sig.ebx, sig.ecx, sig.edx], KVM_SIGNATURE);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.ebx, smt.edx), (1, 3));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 3));
        assert_eq!((find(&c, 0xb, 2).ecx >> 8) & 0xff, 0, "terminator");
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(32), 5);
    }
}
