import runner.launchers.base

def test_x():
    assert runner.launchers.base.Limits
