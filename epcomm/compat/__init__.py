"""Drop-in front ends that answer to other EP libraries' Python APIs on top of epcomm.

    from epcomm.compat import deep_ep        # instead of `import deep_ep`
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)

Each submodule imports torch; the rest of epcomm does not need it.
"""
