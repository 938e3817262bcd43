"""Island.objects.can_run(runtime): which Islands a cargo built for a runtime may go to."""

from islands.models import Island


def test_each_runtime_finds_the_islands_able_to_run_it(alice, bob):
    desktop = Island.objects.create(owner=alice, host_id="desktop-00001", kind=Island.Kind.DESKTOP)
    iphone = Island.objects.create(
        owner=alice, host_id="iphone-000001", kind=Island.Kind.MOBILE, platform="ios", runtime="coreml"
    )
    pixel = Island.objects.create(
        owner=bob, host_id="pixel-0000001", kind=Island.Kind.MOBILE, platform="android", runtime="onnx"
    )
    removed = Island.objects.create(
        owner=bob, host_id="iphone-000002", kind=Island.Kind.MOBILE, platform="ios", runtime="coreml"
    )
    removed.remove()

    assert list(Island.objects.can_run("coreml")) == [iphone]
    assert list(Island.objects.can_run("onnx")) == [pixel]
    assert list(Island.objects.can_run("container")) == [desktop]
    assert list(Island.objects.can_run("WASM")) == [desktop]
    assert list(Island.objects.can_run("tensorrt")) == []


def test_can_run_chains_with_other_filters(alice, bob):
    Island.objects.create(owner=alice, host_id="iphone-000001", kind=Island.Kind.MOBILE, runtime="coreml")
    bobs = Island.objects.create(
        owner=bob, host_id="iphone-000002", kind=Island.Kind.MOBILE, runtime="coreml"
    )
    assert list(Island.objects.owned_by(bob).can_run("coreml")) == [bobs]
    assert list(Island.objects.can_run("coreml").filter(owner=bob)) == [bobs]
