"""Device models (vfiouserd.devices): device semantics only, no sockets.

``virtio.py`` is the API every virtio device plugin implements; each other
module is one device, registered in the ``vfiouserd.devices`` entry-point
group.
"""
