use super::*;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINhe7qQOTtj9pNJNKdCBG/RBt8VR7ymtwb65O6lger5Z test@keel";

fn cfg(cloud_init: &str) -> crate::config::Config {
    let text = format!(
        "version: 1\nnetwork:\n  bridges:\n    - name: br-nat\n      mode: nat\n      address: 10.100.0.1/24\n      dhcp: {{range: 10.100.0.100-10.100.0.199, static_leases: [{{mac: \"02:00:00:00:00:10\", address: 10.100.0.10}}]}}\n    - {{name: br-lan, mode: bridged}}\nguests:\n  - name: web\n    memory: 256MiB\n    boot: disk\n    disks: [{{volume: p/root, size: 1GiB}}]\n    nics: [{{bridge: br-nat, mac: \"02:00:00:00:00:10\"}}, {{bridge: br-lan}}]\n    cloud_init: {cloud_init}\nstorage: {{pools: [{{name: p}}]}}\n"
    );
    crate::config::parse_str(&text).expect("valid").config
}

fn seed_of(cloud_init: &str) -> Seed {
    let c = cfg(cloud_init);
    let g = &c.guests[0];
    let nics = nic_networks(g, &c.network.bridges);
    seed(g, g.cloud_init.as_ref().unwrap(), &nics, None)
}

#[test]
fn a_static_lease_becomes_a_static_address_and_the_rest_dhcp() {
    let s = seed_of("{runcmd: [\"true\"]}");
    assert_eq!(
        s.network_config,
        "version: 2\nethernets:\n  nic0:\n    match:\n      macaddress: \"02:00:00:00:00:10\"\n    dhcp4: false\n    addresses: [\"10.100.0.10/24\"]\n    gateway4: \"10.100.0.1\"\n    nameservers:\n      addresses: [\"10.100.0.1\"]\n  nic1:\n    match:\n      macaddress: \"".to_owned()
            + &cfg("{}").guests[0].nic_mac(1).to_string()
            + "\"\n    dhcp4: true\n"
    );
}

#[test]
fn the_generated_document_quotes_every_string() {
    let s = seed_of(&format!(
        "{{ssh_authorized_keys: [\"{KEY}\"], users: [{{name: alice, sudo: true, groups: [adm, wheel]}}], packages: [nginx], runcmd: [\"echo 'a: b' > /root/marker\"]}}"
    ));
    let expected = format!(
        "#cloud-config\n# made by Keel from the guest's cloud_init settings\nssh_authorized_keys:\n  - \"{KEY}\"\nusers:\n  - default\n  - name: \"alice\"\n    lock_passwd: true\n    shell: \"/bin/bash\"\n    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    groups: \"adm, wheel\"\npackage_update: true\npackages:\n  - \"nginx\"\nruncmd:\n  - \"echo 'a: b' > /root/marker\"\n"
    );
    assert_eq!(s.user_data, expected);
    // The document passes the config's own user_data check.
    crate::config::check_cloud_config(&s.user_data).unwrap();
}

#[test]
fn the_instance_id_is_stable_and_changes_with_the_settings() {
    let a = seed_of("{runcmd: [\"echo one\"]}");
    assert_eq!(a, seed_of("{runcmd: [\"echo one\"]}"));
    let b = seed_of("{runcmd: [\"echo two\"]}");
    assert_ne!(a.meta_data, b.meta_data);
    assert!(a.meta_data.starts_with("instance-id: \"keel-web-"), "{}", a.meta_data);
    assert!(a.meta_data.ends_with("\nlocal-hostname: \"web\"\n"), "{}", a.meta_data);
}

#[test]
fn a_whole_document_is_taken_as_it_is() {
    let s = seed_of("{user_data: \"#cloud-config\\nhostname: other\\n\"}");
    assert_eq!(s.user_data, "#cloud-config\nhostname: other\n");
}

#[test]
fn a_user_data_file_is_bounded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ud");
    std::fs::write(&p, "#cloud-config\nruncmd: [ls]\n").unwrap();
    assert_eq!(read_user_data_file(&p).unwrap(), "#cloud-config\nruncmd: [ls]\n");
    std::fs::write(&p, "#!/bin/sh\nls\n").unwrap();
    assert!(read_user_data_file(&p).unwrap_err().contains("#cloud-config"));
    std::fs::write(&p, vec![b'#'; crate::config::MAX_USER_DATA + 10]).unwrap();
    assert!(read_user_data_file(&p).unwrap_err().contains("1 MiB"));
    let missing = read_user_data_file(&dir.path().join("nope")).unwrap_err();
    assert!(missing.contains("nope"), "{missing}");
}
